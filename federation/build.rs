//! Compiles the gRPC protocols of site links. protox parses the `.proto` files in Rust (no
//! `protoc` binary is needed); every file listed in `PROTOS` becomes a module in `OUT_DIR`.

/// The protocol files of this crate; a new service adds its file here.
const PROTOS: &[&str] = &["proto/federation.proto"];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    for proto in PROTOS {
        println!("cargo:rerun-if-changed={proto}");
    }
    let descriptors = protox::compile(PROTOS, ["proto"])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(descriptors)?;
    Ok(())
}
