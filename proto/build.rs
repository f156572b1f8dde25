//! Compiles `forger/v1/forger.proto` and `tensorboard/event.proto` with the protoc binary
//! shipped by `protoc-bin-vendored`, so building needs no system protoc.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // SAFETY of intent: build scripts are single-threaded; prost-build reads PROTOC.
    unsafe_set_protoc(&protoc);
    tonic_prost_build::configure()
        .bytes(".forger.v1")
        .compile_protos(&["forger/v1/forger.proto"], &["."])?;
    println!("cargo:rerun-if-changed=forger/v1/forger.proto");
    // TensorBoard's event log is a file format, not a service: messages only.
    tonic_prost_build::configure()
        .build_client(false)
        .build_server(false)
        .compile_protos(&["tensorboard/event.proto"], &["."])?;
    println!("cargo:rerun-if-changed=tensorboard/event.proto");
    Ok(())
}

fn unsafe_set_protoc(path: &std::path::Path) {
    // `set_var` is unsafe in edition 2024 only because of other threads; a build script has none.
    #[allow(unsafe_code)]
    unsafe {
        std::env::set_var("PROTOC", path);
    }
}
