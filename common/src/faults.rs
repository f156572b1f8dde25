//! Named places where a test can make a process crash on purpose, to prove that a crash at the
//! worst moment loses nothing.
//!
//! The points are `fail` crate fail points, configured only through the `FAILPOINTS`
//! environment variable (read by [`setup`] at the start of each binary). Unset, each point costs
//! one lookup in an empty registry. `FAILPOINTS=worker-d-upload=return(7)` makes a worker abort
//! while uploading its step-7 discriminator gradient; the value is the step.

/// Reads `FAILPOINTS`; keep the returned guard alive for the life of the process.
pub fn setup() -> fail::FailScenario<'static> {
    fail::FailScenario::setup()
}

/// Aborts the process (no destructors, no flushing: as close to `kill -9` as a process can do to
/// itself) when `FAILPOINTS` configures `name` with this `step`.
pub fn crash_point(name: &str, step: u64) {
    let crash = |arg: Option<String>| {
        if arg.and_then(|a| a.trim().parse::<u64>().ok()) == Some(step) {
            eprintln!("fail point {name} at step {step}: aborting on purpose");
            std::process::abort();
        }
    };
    fail::fail_point!(name, crash);
}
