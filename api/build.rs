// Compiles the proto files with protoc (Debian's protobuf-compiler, which containerd-client's
// and etcd-client's builds need anyway: a pure-Rust compiler here only added crates to build),
// and keeps the encoded descriptors for gRPC server reflection.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = ["proto/plinth/machine/v1/machine.proto"];
    for p in protos {
        println!("cargo:rerun-if-changed={p}");
    }
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .file_descriptor_set_path(out.join("machine_descriptor.bin"))
        .compile_protos(&protos, &["proto"])?;
    Ok(())
}
