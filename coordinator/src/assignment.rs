//! Which worker holds which data shards.
//!
//! The shard count is fixed for the run; workers come and go. Every shard must be held by
//! exactly one worker, the load must be even (holdings differ by at most one shard), and as few
//! shards as possible should move, because a moved shard is a download for its new holder.

/// New holdings for the workers, given what each holds now (in the same order). Shards that no
/// worker holds (their holder was lost) are handed out; a worker keeps what it has up to its
/// fair share. Deterministic: the same input gives the same output.
pub fn rebalance(current: &[Vec<u32>], shards: u32) -> Vec<Vec<u32>> {
    let workers = current.len();
    if workers == 0 {
        return Vec::new();
    }
    let base = shards as usize / workers;
    let extra = shards as usize % workers;
    // The larger shares go to those who already hold the most, so fewer shards move.
    let mut by_holding: Vec<usize> = (0..workers).collect();
    by_holding.sort_by_key(|&w| (std::cmp::Reverse(current[w].len()), w));
    let mut quota = vec![base; workers];
    for &w in by_holding.iter().take(extra) {
        quota[w] += 1;
    }

    let mut taken = vec![false; shards as usize];
    let mut next: Vec<Vec<u32>> = Vec::with_capacity(workers);
    for (w, held) in current.iter().enumerate() {
        let mut keep: Vec<u32> = Vec::new();
        for &shard in held {
            let valid = (shard as usize) < taken.len() && !taken[shard as usize];
            if valid && keep.len() < quota[w] {
                taken[shard as usize] = true;
                keep.push(shard);
            }
        }
        next.push(keep);
    }
    let mut free = (0..shards).filter(|&s| !taken[s as usize]);
    for (w, holding) in next.iter_mut().enumerate() {
        while holding.len() < quota[w] {
            holding.push(free.next().expect("quotas add up to the shard count"));
        }
        holding.sort_unstable();
    }
    next
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check_partition(holdings: &[Vec<u32>], shards: u32) {
        let mut all: Vec<u32> = holdings.iter().flatten().copied().collect();
        all.sort_unstable();
        assert_eq!(all, (0..shards).collect::<Vec<_>>(), "every shard held exactly once");
        let sizes: Vec<usize> = holdings.iter().map(Vec::len).collect();
        assert!(
            sizes.iter().max().unwrap() - sizes.iter().min().unwrap() <= 1,
            "{sizes:?}"
        );
    }

    #[test]
    fn the_first_assignment_gives_one_shard_each() {
        let holdings = rebalance(&[vec![], vec![], vec![]], 3);
        assert_eq!(holdings, vec![vec![0], vec![1], vec![2]]);
    }

    #[test]
    fn a_lost_worker_s_shards_go_to_the_survivors_and_nothing_else_moves() {
        // Worker holding [1] was lost; the others keep theirs.
        let holdings = rebalance(&[vec![0], vec![2]], 3);
        check_partition(&holdings, 3);
        assert!(holdings[0].contains(&0) && holdings[1].contains(&2));
    }

    #[test]
    fn a_newcomer_takes_only_the_surplus() {
        let holdings = rebalance(&[vec![0, 1, 2, 3], vec![4, 5, 6, 7], vec![]], 8);
        check_partition(&holdings, 8);
        let moved: usize =
            8 - holdings[0].iter().filter(|s| **s < 4).count() - holdings[1].iter().filter(|s| **s >= 4).count();
        assert_eq!(moved, holdings[2].len());
        assert_eq!(holdings[2].len(), 2);
    }

    #[test]
    fn scaling_down_to_one_and_up_again_stays_a_partition() {
        let one = rebalance(&[vec![1]], 3);
        assert_eq!(one, vec![vec![0, 1, 2]]);
        let two = rebalance(&[one[0].clone(), vec![]], 3);
        check_partition(&two, 3);
        assert_eq!(two[0].len(), 2);
        let three = rebalance(&[two[0].clone(), two[1].clone(), vec![]], 3);
        check_partition(&three, 3);
    }

    #[test]
    fn stale_or_duplicate_claims_are_ignored() {
        let holdings = rebalance(&[vec![0, 9], vec![0]], 2);
        check_partition(&holdings, 2);
        assert_eq!(holdings[0], vec![0]);
    }
}
