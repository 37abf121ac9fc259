// Compiles the proto files with protox (pure Rust), so building needs no `protoc` on the host.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = ["proto/plinth/machine/v1/machine.proto"];
    for p in protos {
        println!("cargo:rerun-if-changed={p}");
    }
    let fds = protox::compile(protos, ["proto"])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;
    Ok(())
}
