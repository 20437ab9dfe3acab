//! Compiles the gRPC API with a pure-Rust protobuf compiler (no system
//! `protoc`) and embeds the example bundle that `leash serve` serves when no
//! bundle directories are given.

use std::error::Error;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use prost::Message;

fn main() -> Result<(), Box<dyn Error>> {
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);

    println!("cargo:rerun-if-changed=proto");
    let fds = protox::compile(
        ["leash/v1/authorizer.proto", "leash/v1/admin.proto"],
        ["proto"],
    )?;
    // Server reflection serves this descriptor set.
    std::fs::write(out_dir.join("leash_descriptor.bin"), fds.encode_to_vec())?;
    tonic_prost_build::configure()
        .btree_map(".")
        .compile_fds(fds)?;
    // The benchmark's floor service: compiled apart so that reflection on a
    // serving sidecar never advertises it.
    let floor = protox::compile(["leash/bench/v1/floor.proto"], ["proto"])?;
    tonic_prost_build::configure().compile_fds(floor)?;

    embed_example_bundle(&out_dir)?;
    Ok(())
}

/// Writes `embedded_bundle.rs`: one `(directory, relative path, contents)`
/// entry per file under `policies/` and `schemas/`.
fn embed_example_bundle(out_dir: &Path) -> Result<(), Box<dyn Error>> {
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?);
    let mut code = String::from("&[\n");
    for dir in ["policies", "schemas"] {
        println!("cargo:rerun-if-changed={dir}");
        let base = root.join(dir);
        let mut files = Vec::new();
        collect_files(&base, &mut files)?;
        let mut files = files
            .into_iter()
            .map(|file| {
                let rel = file
                    .strip_prefix(&base)?
                    .to_string_lossy()
                    .replace('\\', "/");
                Ok((rel, file))
            })
            .collect::<Result<Vec<_>, Box<dyn Error>>>()?;
        // Ordered by the path as shown, as a directory load orders its files,
        // so the same files give the same bundle version either way.
        files.sort();
        for (rel, file) in files {
            println!("cargo:rerun-if-changed={}", file.display());
            writeln!(
                code,
                "    ({dir:?}, {rel:?}, include_str!({:?})),",
                file.display().to_string()
            )?;
        }
    }
    code.push_str("]\n");
    std::fs::write(out_dir.join("embedded_bundle.rs"), code)?;
    Ok(())
}

fn collect_files(dir: &Path, out: &mut Vec<PathBuf>) -> Result<(), Box<dyn Error>> {
    if !dir.is_dir() {
        return Ok(());
    }
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        // What a directory load skips, skipped here too: hidden names (an
        // editor's swap file would not even be text) and files of no
        // bundle kind.
        if name.starts_with('.') || name == "lost+found" {
            continue;
        }
        if path.is_dir() {
            collect_files(&path, out)?;
        } else if [".cedar", ".json", ".cedarschema"]
            .iter()
            .any(|suffix| name.ends_with(suffix))
        {
            out.push(path);
        }
    }
    Ok(())
}
