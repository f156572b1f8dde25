//! Compiles `forger/v1/forger.proto` with the protoc binary shipped by `protoc-bin-vendored`,
//! so building needs no system protoc.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // SAFETY of intent: build scripts are single-threaded; prost-build reads PROTOC.
    unsafe_set_protoc(&protoc);
    tonic_prost_build::configure()
        .bytes(".forger.v1")
        .compile_protos(&["forger/v1/forger.proto"], &["."])?;
    println!("cargo:rerun-if-changed=forger/v1/forger.proto");
    Ok(())
}

fn unsafe_set_protoc(path: &std::path::Path) {
    // `set_var` is unsafe in edition 2024 only because of other threads; a build script has none.
    #[allow(unsafe_code)]
    unsafe {
        std::env::set_var("PROTOC", path);
    }
}
