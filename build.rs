//! Compiles the wire contract (`proto/roomwire/v1/roomwire.proto`) with a vendored `protoc`, so a
//! fresh machine needs no system Protobuf install.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "proto/roomwire/v1/roomwire.proto";
    println!("cargo:rerun-if-changed={proto}");
    prost_build::Config::new()
        .protoc_executable(protoc_bin_vendored::protoc_bin_path()?)
        // Payloads stay `bytes::Bytes`: decoding slices the received buffer instead of copying.
        .bytes(["."])
        .compile_protos(&[proto], &["proto"])?;
    Ok(())
}
