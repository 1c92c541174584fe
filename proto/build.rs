//! Compiles `proto/lockstep/v1/*.proto` with protox (no system `protoc`) and writes the file
//! descriptor set that gRPC reflection serves.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("proto");
    let mut files: Vec<PathBuf> = std::fs::read_dir(root.join("lockstep/v1"))?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|path| path.extension().is_some_and(|ext| ext == "proto"))
        .collect();
    files.sort();
    println!("cargo:rerun-if-changed={}", root.display());

    let mut compiler = protox::Compiler::new([&root])?;
    compiler
        .include_imports(true)
        .include_source_info(true)
        .open_files(&files)?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out.join("lockstep_v1_descriptor.bin"),
        compiler.encode_file_descriptor_set(),
    )?;
    // Every message serializes for the CLI's `--json` (`wire` names states and times); maps
    // are ordered, so JSON output is stable.
    let mut config = tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .btree_map(".")
        .type_attribute(".lockstep.v1", "#[derive(serde::Serialize)]");
    for (field, attribute) in [
        (
            "BackupJob.state",
            "serialize_with = \"crate::wire::job_state\"",
        ),
        (
            "RestoreJob.phase",
            "serialize_with = \"crate::wire::restore_phase\"",
        ),
        (
            "BarrierStatus.state",
            "serialize_with = \"crate::wire::barrier_state\"",
        ),
        (
            "RestoreStatus.state",
            "serialize_with = \"crate::wire::restore_state\"",
        ),
        (
            "PrepareRequest.capture",
            "serialize_with = \"crate::wire::capture_mode\"",
        ),
        (
            "ShardRestorePlan.target_hlc",
            "rename = \"target_time\", serialize_with = \"crate::wire::hlc_time\"",
        ),
        (
            "TagPoint.hlc",
            "rename = \"time\", serialize_with = \"crate::wire::hlc_time\"",
        ),
        (
            "WalDestinationStatus.shipped_hlc",
            "rename = \"shipped_time\", serialize_with = \"crate::wire::hlc_time\"",
        ),
    ] {
        config = config.field_attribute(
            format!(".lockstep.v1.{field}"),
            format!("#[serde({attribute})]"),
        );
    }
    config.compile_fds(compiler.file_descriptor_set())?;
    Ok(())
}
