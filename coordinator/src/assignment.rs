//! Which worker holds which data shards.
//!
//! The shard count is fixed for the run; workers come and go, each running one or more
//! replicas that compute a shard at a time. Every shard must be held by exactly one worker,
//! the load must follow the replicas (shards per replica as even as whole shards allow), and
//! as few shards as possible should move, because a moved shard is a download for its new
//! holder.

use std::cmp::Reverse;

/// New holdings for the workers, given what each holds now and how many replicas each runs (in
/// the same order; 0 counts as 1). Shards that no worker holds (their holder was lost) are
/// handed out; a worker keeps what it has up to its share (see `quotas`). Deterministic: the same
/// input gives the same output.
pub fn rebalance(current: &[Vec<u32>], replicas: &[u32], shards: u32) -> Vec<Vec<u32>> {
    assert_eq!(current.len(), replicas.len(), "one replica count per worker");
    let quota = quotas(current, replicas, shards);
    let mut taken = vec![false; shards as usize];
    let mut next: Vec<Vec<u32>> = Vec::with_capacity(current.len());
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

/// How many shards each worker should hold. Every worker gets one first (there are never more
/// workers than shards: a place in the job is a shard), so none sits idle; then each further
/// shard goes to the worker whose shards per replica would be lowest after taking it, which
/// leaves the largest shards-per-replica, what the slowest worker's step takes, as small as it
/// can be. Ties go to the worker already holding more, so fewer shards move, then to the
/// earlier one. With equal replicas this is the even split, holdings differing by at most one.
fn quotas(current: &[Vec<u32>], replicas: &[u32], shards: u32) -> Vec<usize> {
    let workers = current.len();
    let capacity: Vec<u64> = replicas.iter().map(|&r| u64::from(r.max(1))).collect();
    let holding: Vec<usize> = current.iter().map(Vec::len).collect();
    let mut quota = vec![0usize; workers];
    let mut by_holding: Vec<usize> = (0..workers).collect();
    by_holding.sort_by_key(|&w| (Reverse(holding[w]), w));
    for &w in by_holding.iter().take(shards as usize) {
        quota[w] = 1;
    }
    for _ in workers.min(shards as usize)..shards as usize {
        // (quota[a] + 1) / capacity[a] against the same for b, in integers.
        let next = (0..workers)
            .min_by(|&a, &b| {
                let load_a = (quota[a] as u64 + 1) * capacity[b];
                let load_b = (quota[b] as u64 + 1) * capacity[a];
                load_a.cmp(&load_b).then(holding[b].cmp(&holding[a])).then(a.cmp(&b))
            })
            .expect("shards beyond the first round imply a worker");
        quota[next] += 1;
    }
    quota
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check_partition_only(holdings: &[Vec<u32>], shards: u32) {
        let mut all: Vec<u32> = holdings.iter().flatten().copied().collect();
        all.sort_unstable();
        assert_eq!(all, (0..shards).collect::<Vec<_>>(), "every shard held exactly once");
    }

    /// A partition with even holdings (workers of equal replicas).
    fn check_partition(holdings: &[Vec<u32>], shards: u32) {
        check_partition_only(holdings, shards);
        let sizes: Vec<usize> = holdings.iter().map(Vec::len).collect();
        assert!(
            sizes.iter().max().unwrap() - sizes.iter().min().unwrap() <= 1,
            "{sizes:?}"
        );
    }

    #[test]
    fn the_first_assignment_gives_one_shard_each() {
        let holdings = rebalance(&[vec![], vec![], vec![]], &[1, 1, 1], 3);
        assert_eq!(holdings, vec![vec![0], vec![1], vec![2]]);
    }

    #[test]
    fn a_lost_worker_s_shards_go_to_the_survivors_and_nothing_else_moves() {
        // Worker holding [1] was lost; the others keep theirs.
        let holdings = rebalance(&[vec![0], vec![2]], &[1, 1], 3);
        check_partition(&holdings, 3);
        assert!(holdings[0].contains(&0) && holdings[1].contains(&2));
    }

    #[test]
    fn a_newcomer_takes_only_the_surplus() {
        let holdings = rebalance(&[vec![0, 1, 2, 3], vec![4, 5, 6, 7], vec![]], &[1, 1, 1], 8);
        check_partition(&holdings, 8);
        let moved: usize =
            8 - holdings[0].iter().filter(|s| **s < 4).count() - holdings[1].iter().filter(|s| **s >= 4).count();
        assert_eq!(moved, holdings[2].len());
        assert_eq!(holdings[2].len(), 2);
    }

    #[test]
    fn scaling_down_to_one_and_up_again_stays_a_partition() {
        let one = rebalance(&[vec![1]], &[1], 3);
        assert_eq!(one, vec![vec![0, 1, 2]]);
        let two = rebalance(&[one[0].clone(), vec![]], &[1, 1], 3);
        check_partition(&two, 3);
        assert_eq!(two[0].len(), 2);
        let three = rebalance(&[two[0].clone(), two[1].clone(), vec![]], &[1, 1, 1], 3);
        check_partition(&three, 3);
    }

    /// The largest shards per replica, as a fraction to compare exactly: (shards, replicas).
    fn largest_load(holdings: &[Vec<u32>], replicas: &[u32]) -> (u64, u64) {
        holdings
            .iter()
            .zip(replicas)
            .map(|(h, &r)| (h.len() as u64, u64::from(r.max(1))))
            .max_by(|a, b| (a.0 * b.1).cmp(&(b.0 * a.1)))
            .unwrap()
    }

    /// The smallest largest-load over every way of giving each worker at least one shard.
    fn best_largest_load(replicas: &[u32], shards: u32) -> (u64, u64) {
        fn search(replicas: &[u32], left: u32, loads: &mut Vec<(u64, u64)>, best: &mut Option<(u64, u64)>) {
            if loads.len() == replicas.len() {
                if left > 0 {
                    return;
                }
                let worst = *loads.iter().max_by(|a, b| (a.0 * b.1).cmp(&(b.0 * a.1))).unwrap();
                if best.is_none_or(|b| worst.0 * b.1 < b.0 * worst.1) {
                    *best = Some(worst);
                }
                return;
            }
            let others = (replicas.len() - loads.len() - 1) as u32;
            for k in 1..=left.saturating_sub(others) {
                loads.push((u64::from(k), u64::from(replicas[loads.len()].max(1))));
                search(replicas, left - k, loads, best);
                loads.pop();
            }
        }
        let mut best = None;
        search(replicas, shards, &mut Vec::new(), &mut best);
        best.unwrap()
    }

    #[test]
    fn shards_follow_the_replicas() {
        // A worker of two replicas beside one of one, on three shards: two and one.
        let holdings = rebalance(&[vec![], vec![]], &[2, 1], 3);
        assert_eq!(holdings, vec![vec![0, 1], vec![2]]);
        // Three replicas against one, on four shards: three and one, not an even two and two.
        let holdings = rebalance(&[vec![], vec![]], &[3, 1], 4);
        check_partition_only(&holdings, 4);
        assert_eq!(holdings.iter().map(Vec::len).collect::<Vec<_>>(), vec![3, 1]);
        // Two nodes of four GPUs on a job of six shards: three each, none idle.
        let holdings = rebalance(&[vec![], vec![]], &[4, 4], 6);
        assert_eq!(holdings.iter().map(Vec::len).collect::<Vec<_>>(), vec![3, 3]);
        // Old workers say 0 replicas, which counts as 1.
        assert_eq!(rebalance(&[vec![], vec![]], &[0, 1], 2), vec![vec![0], vec![1]]);
    }

    #[test]
    fn every_worker_holds_a_shard_even_beside_a_large_one() {
        // Proportional shares would leave a one-replica worker with nothing here.
        let holdings = rebalance(&[vec![0], vec![1], vec![]], &[1, 1, 4], 3);
        assert_eq!(holdings, vec![vec![0], vec![1], vec![2]]);
    }

    #[test]
    fn a_node_that_joins_takes_only_the_surplus_in_proportion_to_its_replicas() {
        let holdings = rebalance(&[vec![0, 1, 2], vec![3, 4, 5], vec![]], &[1, 1, 2], 6);
        check_partition_only(&holdings, 6);
        let kept = holdings[0].iter().filter(|s| **s < 3).count() + holdings[1].iter().filter(|s| **s >= 3).count();
        assert_eq!(6 - kept, holdings[2].len(), "only the newcomer's shards moved");
        assert_eq!(largest_load(&holdings, &[1, 1, 2]), (2, 1));
        // Its replicas leaving again: their shards go back, nothing else moves.
        let back = rebalance(&[holdings[0].clone(), holdings[1].clone()], &[1, 1], 6);
        check_partition(&back, 6);
        assert!(holdings[0].iter().all(|s| back[0].contains(s)));
        assert!(holdings[1].iter().all(|s| back[1].contains(s)));
    }

    #[test]
    fn weighted_holdings_are_a_partition_with_the_smallest_largest_load_and_the_fewest_moves() {
        // Every small case, against a brute-force search; the holdings are pseudo-random
        // leftovers of earlier assignments, stale and duplicate claims included.
        let mut state = 12345u64;
        let mut next = |below: u64| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (state >> 33) % below
        };
        for _ in 0..400 {
            let workers = 1 + next(4) as usize;
            let shards = workers as u32 + next(7) as u32;
            let replicas: Vec<u32> = (0..workers).map(|_| next(5) as u32).collect();
            let current: Vec<Vec<u32>> = (0..workers)
                .map(|_| (0..next(4)).map(|_| next(u64::from(shards) + 2) as u32).collect())
                .collect();
            let holdings = rebalance(&current, &replicas, shards);
            check_partition_only(&holdings, shards);
            assert!(
                holdings.iter().all(|h| !h.is_empty()),
                "{current:?} {replicas:?}: an idle worker"
            );
            let (got, best) = (largest_load(&holdings, &replicas), best_largest_load(&replicas, shards));
            assert_eq!(
                got.0 * best.1,
                best.0 * got.1,
                "{current:?} {replicas:?} {shards}: largest load {got:?}, best {best:?}"
            );
            // Each worker keeps as many of its valid claims as its share allows.
            let quota = quotas(&current, &replicas, shards);
            let mut claimed = vec![false; shards as usize];
            for (w, held) in current.iter().enumerate() {
                let mut valid = 0;
                for &s in held {
                    if (s as usize) < claimed.len() && !claimed[s as usize] && valid < quota[w] {
                        claimed[s as usize] = true;
                        valid += 1;
                    }
                }
                let kept = holdings[w].iter().filter(|s| held.contains(s)).count();
                assert_eq!(
                    kept, valid,
                    "{current:?} {replicas:?}: worker {w} gave up shards it could keep"
                );
            }
            assert_eq!(rebalance(&current, &replicas, shards), holdings, "deterministic");
        }
    }

    #[test]
    fn stale_or_duplicate_claims_are_ignored() {
        let holdings = rebalance(&[vec![0, 9], vec![0]], &[1, 1], 2);
        check_partition(&holdings, 2);
        assert_eq!(holdings[0], vec![0]);
    }
}
