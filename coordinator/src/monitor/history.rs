//! A resumed run's plot goes on from its metrics log: the steps and scores up to the
//! checkpoint it resumed from (the log was already cut there when it was opened).

use std::path::Path;

use crate::plot::{LossPoint, ScorePoint};

/// The losses and scores in `metrics.jsonl`. Lines that do not parse (a torn last line) are
/// left out; a non-finite loss, written as `null`, reads as NaN so the step still counts.
pub fn read_history(path: &Path) -> std::io::Result<(Vec<LossPoint>, Vec<ScorePoint>)> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(e),
    };
    let (mut losses, mut scores) = (Vec::new(), Vec::new());
    for line in text.lines() {
        let Ok(value) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let Some(step) = value.get("step").and_then(serde_json::Value::as_u64) else {
            continue;
        };
        let number = |key: &str| value.get(key).and_then(serde_json::Value::as_f64).unwrap_or(f64::NAN);
        let flag = |key: &str| value.get(key).and_then(serde_json::Value::as_bool).unwrap_or(false);
        if value.get("swd").is_some() {
            scores.push(ScorePoint {
                step,
                swd: number("swd"),
            });
        } else {
            losses.push(LossPoint {
                step,
                loss_d: number("loss_d"),
                loss_g: number("loss_g"),
                train_d: flag("train_d"),
                train_g: flag("train_g"),
            });
        }
    }
    Ok((losses, scores))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_scores_nulls_and_torn_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("metrics.jsonl");
        std::fs::write(
            &path,
            concat!(
                r#"{"step":1,"loss_d":0.7,"loss_g":0.6,"train_d":true,"train_g":false}"#,
                "\n",
                r#"{"step":2,"loss_d":null,"loss_g":null,"train_d":false,"train_g":false}"#,
                "\n",
                r#"{"step":2,"swd":41.5,"swd_levels":[40.0,43.0]}"#,
                "\n",
                r#"{"step":3,"loss_d":0."#,
            ),
        )
        .unwrap();
        let (losses, scores) = read_history(&path).unwrap();
        assert_eq!(losses.len(), 2);
        assert!(losses[0].train_d && !losses[0].train_g);
        assert!(losses[1].loss_d.is_nan());
        assert_eq!((scores.len(), scores[0].step, scores[0].swd), (1, 2, 41.5));
        assert_eq!(read_history(&dir.path().join("missing")).unwrap().0.len(), 0);
    }
}
