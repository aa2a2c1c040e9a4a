//! File helpers: atomic writes and JSON reading with errors that name the file.

use crate::error::{Error, Result};
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::io::Write;
use std::path::Path;

/// The directory `path` is written in (created if missing), where its temporary file goes so the
/// final rename stays on one file system.
fn parent_dir(path: &Path) -> Result<std::path::PathBuf> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => std::path::PathBuf::from("."),
    };
    std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
    Ok(dir)
}

/// A temporary file beside `path` (removed if dropped before [`persist`]).
fn temp_beside(path: &Path) -> Result<tempfile::NamedTempFile> {
    let dir = parent_dir(path)?;
    tempfile::Builder::new()
        .prefix(".adapterkit-")
        .suffix(".tmp")
        .tempfile_in(&dir)
        .map_err(|e| Error::io(&dir, e))
}

/// Flushes `tmp` to disk and renames it to `path`.
fn persist(tmp: tempfile::NamedTempFile, path: &Path) -> Result<()> {
    tmp.as_file().sync_all().map_err(|e| Error::io(path, e))?;
    // Temporary files are created private (0600); what we save is meant to be shared and served.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o644))
            .map_err(|e| Error::io(path, e))?;
    }
    tmp.persist(path).map_err(|e| Error::io(path, e.error))?;
    Ok(())
}

/// Writes `bytes` to `path` through a temporary file in the same directory and a rename, so a crash
/// mid-write leaves the previous file intact.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut tmp = temp_beside(path)?;
    tmp.write_all(bytes).map_err(|e| Error::io(path, e))?;
    persist(tmp, path)
}

/// Serialises `value` as pretty JSON (keys in struct order, maps sorted) and writes it atomically.
pub fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<()> {
    let mut s = serde_json::to_string_pretty(value).map_err(|e| Error::Json {
        path: path.to_path_buf(),
        source: e,
    })?;
    s.push('\n');
    write_atomic(path, s.as_bytes())
}

/// Reads and parses a JSON file, naming the file on failure.
pub fn read_json<T: DeserializeOwned>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| Error::Json {
        path: path.to_path_buf(),
        source: e,
    })
}

/// Saves named tensors as safetensors, atomically.
pub fn save_safetensors(
    path: &Path,
    tensors: &std::collections::BTreeMap<String, candle_core::Tensor>,
) -> Result<()> {
    let tmp = temp_beside(path)?;
    let map: std::collections::HashMap<String, candle_core::Tensor> = tensors
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    candle_core::safetensors::save(&map, tmp.path())?;
    // candle wrote through its own handle: reopen so the sync covers its data.
    std::fs::File::open(tmp.path())
        .and_then(|f| f.sync_all())
        .map_err(|e| Error::io(path, e))?;
    persist(tmp, path)
}

/// Loads every tensor of a safetensors file (or a PyTorch pickle `.bin`) on the CPU.
pub fn load_tensors(path: &Path) -> Result<std::collections::HashMap<String, candle_core::Tensor>> {
    if !path.exists() {
        return Err(Error::io(
            path,
            std::io::Error::new(std::io::ErrorKind::NotFound, "file not found"),
        ));
    }
    let is_pickle = path
        .extension()
        .map(|e| e == "bin" || e == "pt" || e == "pth")
        .unwrap_or(false);
    let device = candle_core::Device::Cpu;
    let loaded = if is_pickle {
        candle_core::pickle::read_all(path).map(|v| v.into_iter().collect())
    } else {
        candle_core::safetensors::load(path, &device)
    };
    loaded.map_err(|e| Error::Data {
        path: path.to_path_buf(),
        line: 0,
        message: format!("cannot read tensors: {e}"),
    })
}

/// Removes tensor `name` from `tensors` (read from `path`), checks that its shape is `shape` and
/// returns it as f32 on `device`: the one way a stored tensor enters the model.
pub fn take_tensor(
    tensors: &mut std::collections::HashMap<String, candle_core::Tensor>,
    path: &Path,
    name: &str,
    shape: &[usize],
    device: &candle_core::Device,
) -> Result<candle_core::Tensor> {
    let t = tensors.remove(name).ok_or_else(|| Error::MissingTensor {
        path: path.to_path_buf(),
        name: name.to_string(),
    })?;
    if t.dims() != shape {
        return Err(Error::TensorShape {
            path: path.to_path_buf(),
            name: name.to_string(),
            expected: shape.to_vec(),
            found: t.dims().to_vec(),
        });
    }
    Ok(t.to_dtype(candle_core::DType::F32)?.to_device(device)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_write_replaces_and_leaves_no_temp() {
        let dir = std::env::temp_dir().join(format!("ak-io-{}", std::process::id()));
        let p = dir.join("a.json");
        write_atomic(&p, b"one").unwrap();
        write_atomic(&p, b"two").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
        let names: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 1, "{names:?}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
