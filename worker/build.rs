//! Link arguments that torch-sys cannot give us.
//!
//! torch-sys links libtorch, but `cargo:rustc-link-arg` from a build script only reaches that
//! package's own targets, so two things are missing from our binaries and tests:
//!
//! - an rpath to libtorch's folder, without which every binary needs `LD_LIBRARY_PATH`;
//! - `--no-as-needed` around `libtorch_cuda.so`. Rust code never names a symbol from it (CUDA
//!   kernels register themselves from static constructors), so with rustc's default
//!   `--as-needed` the linker drops it and the binary silently has no CUDA device
//!   (tch-rs issues 907 and 980). Linking it with `--no-as-needed` keeps it `NEEDED`.
//!
//! torch-sys exports its libtorch folder as `DEP_TCH_LIBTORCH_LIB` (its `links` key is "tch"),
//! which reaches us because we depend on torch-sys directly.

use std::env;
use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    if env::var("CARGO_CFG_TARGET_OS").as_deref() != Ok("linux") {
        return;
    }
    // torch-sys prints it on Linux and macOS whenever it builds against a real libtorch; its
    // `doc-only` feature has none, and then there is nothing to link.
    let Some(lib_dir) = env::var_os("DEP_TCH_LIBTORCH_LIB").map(PathBuf::from) else {
        return;
    };
    println!("cargo:rustc-link-arg=-Wl,-rpath={}", lib_dir.display());
    println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
    // A CPU-only libtorch has no libtorch_cuda.so; naming it would fail the link.
    if lib_dir.join("libtorch_cuda.so").exists() {
        println!("cargo:rustc-link-arg=-ltorch_cuda");
    }
    println!("cargo:rustc-link-arg=-ltorch");
    // Restore rustc's default for whatever the linker sees after us.
    println!("cargo:rustc-link-arg=-Wl,--as-needed");
}
