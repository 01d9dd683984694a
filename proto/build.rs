//! Compiles `endofm/v1/service.proto` with the vendored protoc (no system protoc needed) and
//! writes the descriptor set that the coordinator's reflection service serves.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // SAFETY-free: build scripts are single-threaded; prost-build reads PROTOC.
    unsafe_set_protoc(&protoc);
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        .file_descriptor_set_path(out.join("endofm_v1_descriptor.bin"))
        // Metrics print in name order.
        .btree_map(".endofm.v1.JobResult.metrics")
        .compile_protos(&["endofm/v1/service.proto"], &["."])?;
    println!("cargo:rerun-if-changed=endofm/v1/service.proto");
    Ok(())
}

#[allow(unsafe_code)]
fn unsafe_set_protoc(path: &std::path::Path) {
    // Setting an environment variable is unsafe in edition 2024 because other threads may read
    // the environment; this build script has no other threads.
    unsafe { std::env::set_var("PROTOC", path) };
}
