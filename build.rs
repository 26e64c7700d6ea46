//! Compiles the wire contract (`proto/roomwire/v1/roomwire.proto`) and the mesh's internal
//! node-to-node messages (`proto/roomwire/mesh/v1/mesh.proto`) with a vendored `protoc`, so a
//! fresh machine needs no system Protobuf install.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = [
        "proto/roomwire/v1/roomwire.proto",
        "proto/roomwire/mesh/v1/mesh.proto",
    ];
    for proto in protos {
        println!("cargo:rerun-if-changed={proto}");
    }
    prost_build::Config::new()
        .protoc_executable(protoc_bin_vendored::protoc_bin_path()?)
        // Payloads stay `bytes::Bytes`: decoding slices the received buffer instead of copying.
        .bytes(["."])
        .compile_protos(&protos, &["proto"])?;
    Ok(())
}
