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
        read_safetensors(path, &device).map_err(candle_core::Error::Msg)
    };
    loaded.map_err(|e| Error::Data {
        path: path.to_path_buf(),
        line: 0,
        message: format!("cannot read tensors: {e}"),
    })
}

/// The largest safetensors header accepted (the format's own limit).
const MAX_SAFETENSORS_HEADER: u64 = 100_000_000;

/// Reads a safetensors file one tensor at a time, never the whole file at once: a copy of a
/// BERT-base checkpoint (440 MB) held beside its tensors doubled the peak memory of loading it.
/// Checks what the format's own reader checks: a header of at most 100 MB, tensors laid end to
/// end from offset 0, each as long as its shape and dtype say, the last ending the file.
fn read_safetensors(
    path: &Path,
    device: &candle_core::Device,
) -> std::result::Result<std::collections::HashMap<String, candle_core::Tensor>, String> {
    use candle_core::DType;
    use std::io::Read;
    #[derive(serde::Deserialize)]
    struct Entry {
        dtype: String,
        shape: Vec<usize>,
        data_offsets: [u64; 2],
    }
    let io = |e: std::io::Error| e.to_string();
    let mut file = std::fs::File::open(path).map_err(io)?;
    let len = file.metadata().map_err(io)?.len();
    let mut n = [0u8; 8];
    file.read_exact(&mut n)
        .map_err(|_| format!("{len} bytes are too few for a safetensors header"))?;
    let n = u64::from_le_bytes(n);
    if n > MAX_SAFETENSORS_HEADER || n > len - 8 {
        return Err(format!(
            "a header of {n} bytes does not fit a file of {len} bytes (at most \
             {MAX_SAFETENSORS_HEADER})"
        ));
    }
    let mut header = vec![0u8; n as usize];
    file.read_exact(&mut header).map_err(io)?;
    let header: std::collections::HashMap<String, serde_json::Value> =
        serde_json::from_slice(&header).map_err(|e| format!("header: {e}"))?;
    let mut entries = header
        .into_iter()
        .filter(|(name, _)| name != "__metadata__")
        .map(|(name, v)| match serde_json::from_value::<Entry>(v) {
            Ok(e) => Ok((name, e)),
            Err(e) => Err(format!("header entry `{name}`: {e}")),
        })
        .collect::<std::result::Result<Vec<_>, String>>()?;
    entries.sort_by_key(|(_, e)| e.data_offsets[0]);
    let data_len = len - 8 - n;
    let mut at = 0u64;
    let mut out = std::collections::HashMap::with_capacity(entries.len());
    for (name, e) in entries {
        let dtype = match e.dtype.as_str() {
            "F32" => DType::F32,
            "F16" => DType::F16,
            "BF16" => DType::BF16,
            "F64" => DType::F64,
            "I64" => DType::I64,
            "I32" => DType::I32,
            "I16" => DType::I16,
            "U32" => DType::U32,
            "U8" => DType::U8,
            other => return Err(format!("tensor `{name}` has dtype {other}, unknown here")),
        };
        let bytes = e
            .shape
            .iter()
            .try_fold(dtype.size_in_bytes(), |acc, &d| acc.checked_mul(d))
            .ok_or_else(|| format!("tensor `{name}`: shape {:?} overflows", e.shape))?;
        let [start, end] = e.data_offsets;
        if start != at || end < start || end - start != bytes as u64 || end > data_len {
            return Err(format!(
                "tensor `{name}`: data offsets [{start}, {end}] of {data_len} bytes of data do not \
                 follow the previous tensor's end ({at}) with its {bytes} bytes"
            ));
        }
        at = end;
        let mut buf = vec![0u8; bytes];
        file.read_exact(&mut buf).map_err(io)?;
        let t = candle_core::Tensor::from_raw_buffer(&buf, dtype, &e.shape, device)
            .map_err(|err| format!("tensor `{name}`: {err}"))?;
        out.insert(name, t);
    }
    if at != data_len {
        return Err(format!(
            "the tensors end at byte {at} of the {data_len} bytes of data"
        ));
    }
    Ok(out)
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
    use candle_core::DType;
    let bad = |message: String| Error::BadTensor {
        path: path.to_path_buf(),
        name: name.to_string(),
        message,
    };
    if !matches!(
        t.dtype(),
        DType::F16 | DType::BF16 | DType::F32 | DType::F64
    ) {
        return Err(bad(format!(
            "is {:?}, expected floating point weights (f16, bf16, f32 or f64)",
            t.dtype()
        )));
    }
    let t = t.to_dtype(DType::F32)?;
    // A NaN or infinite weight turns every prediction into NaN (or one class) without an error.
    if let Some(i) = t
        .flatten_all()?
        .to_vec1::<f32>()?
        .iter()
        .position(|v| !v.is_finite())
    {
        return Err(bad(format!(
            "holds NaN or infinite values (first at flat index {i}): the file is damaged or \
             the training that wrote it diverged"
        )));
    }
    Ok(t.to_device(device)?)
}

/// Prefix of the staging directories [`replace_dir`] creates beside a target named `name`.
fn staging_prefix(name: &str) -> String {
    format!(".{name}.adapterkit-")
}

/// Whether process `pid` is gone (Linux; elsewhere every process counts as alive).
fn process_gone(pid: u32) -> bool {
    cfg!(target_os = "linux") && !Path::new(&format!("/proc/{pid}")).exists()
}

/// Prefix of the write probe [`check_replace_target`] creates in the parent, before its pid.
const PROBE_PREFIX: &str = ".adapterkit-probe-";

/// Calls `remove(path, rest of the name)` for each entry of `parent` named `{prefix}{pid}-…`
/// whose process is gone: what a process killed mid-save left.
fn remove_stale(parent: &Path, prefix: &str, mut remove: impl FnMut(&Path, &str)) {
    let Ok(entries) = std::fs::read_dir(parent) else {
        return;
    };
    for e in entries.flatten() {
        let file_name = e.file_name();
        let Some(rest) = file_name.to_str().and_then(|n| n.strip_prefix(prefix)) else {
            continue;
        };
        let pid = rest.split('-').next().and_then(|p| p.parse::<u32>().ok());
        if pid.is_some_and(process_gone) {
            remove(&e.path(), rest);
        }
    }
}

/// Removes staging directories beside `dst` left by processes that died mid-save; an old
/// directory moved aside by a save that died before the new one took its place is put back.
fn clean_stale_staging(parent: &Path, name: &str, dst: &Path) {
    remove_stale(parent, &staging_prefix(name), |path, rest| {
        if rest.ends_with("-old") && !dst.exists() {
            let _ = std::fs::rename(path, dst);
        } else {
            let _ = std::fs::remove_dir_all(path);
        }
    });
}

/// Swaps the directories `a` and `b` in one step (Linux `renameat2(RENAME_EXCHANGE)`); `false`
/// where the system or file system cannot.
#[cfg(target_os = "linux")]
fn exchange(a: &Path, b: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let (Ok(a), Ok(b)) = (
        std::ffi::CString::new(a.as_os_str().as_bytes()),
        std::ffi::CString::new(b.as_os_str().as_bytes()),
    ) else {
        return false;
    };
    // SAFETY: two valid NUL-terminated paths relative to the working directory; the call reads
    // them and touches nothing else of this process.
    let rc = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            a.as_ptr(),
            libc::AT_FDCWD,
            b.as_ptr(),
            libc::RENAME_EXCHANGE,
        )
    };
    rc == 0
}

#[cfg(not(target_os = "linux"))]
fn exchange(_: &Path, _: &Path) -> bool {
    false
}

/// Flushes a directory's entries (its renames) to disk; best effort where unsupported.
fn sync_dir(dir: &Path) {
    if let Ok(f) = std::fs::File::open(dir) {
        let _ = f.sync_all();
    }
}

/// Checks that [`replace_dir`] can replace `dst` (a UTF-8 name, not a file, no foreign files, a
/// writable parent), before the work whose result goes there; returns its name and parent.
pub fn check_replace_target(
    dst: &Path,
    replaceable: &dyn Fn(&str) -> bool,
) -> Result<(String, std::path::PathBuf)> {
    let name = dst
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| {
            Error::io(
                dst,
                std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    "the directory needs a UTF-8 name (not `..` or `/`)",
                ),
            )
        })?
        .to_string();
    let parent = parent_dir(dst)?;
    // A directory we cannot write in is found now, not after the work whose result goes there.
    // The probe carries our pid: one left by a process killed while it existed is removed here.
    remove_stale(&parent, PROBE_PREFIX, |path, _| {
        let _ = std::fs::remove_file(path);
    });
    tempfile::Builder::new()
        .prefix(&format!("{PROBE_PREFIX}{}-", std::process::id()))
        .tempfile_in(&parent)
        .map_err(|e| Error::io(&parent, e))?;
    if dst.exists() {
        if !dst.is_dir() {
            return Err(Error::io(
                dst,
                std::io::Error::new(
                    std::io::ErrorKind::AlreadyExists,
                    "exists and is not a directory",
                ),
            ));
        }
        for e in std::fs::read_dir(dst).map_err(|e| Error::io(dst, e))? {
            let e = e.map_err(|e| Error::io(dst, e))?;
            let f = e.file_name().to_string_lossy().into_owned();
            if !replaceable(&f) {
                return Err(Error::io(
                    dst,
                    std::io::Error::new(
                        std::io::ErrorKind::AlreadyExists,
                        format!(
                            "holds `{f}`, which is not a file of an adapter directory; saving \
                             replaces the whole directory, so move it or choose another output"
                        ),
                    ),
                ));
            }
        }
    }
    Ok((name, parent))
}

/// Replaces the directory `dst` as a whole with what `write` puts into a fresh staging directory
/// beside it: the new directory takes the old one's place in one rename, so a crash at any moment
/// leaves either the complete old or the complete new directory (plus, at worst, a hidden staging
/// directory, removed by the next save to `dst`). A file of `dst` that `replaceable` does not
/// accept makes it refuse before anything is written: the save would delete it.
pub fn replace_dir<R>(
    dst: &Path,
    replaceable: &dyn Fn(&str) -> bool,
    write: impl FnOnce(&Path) -> Result<R>,
) -> Result<R> {
    let (name, parent) = check_replace_target(dst, replaceable)?;
    clean_stale_staging(&parent, &name, dst);
    let staging = tempfile::Builder::new()
        .prefix(&format!("{}{}-", staging_prefix(&name), std::process::id()))
        .tempdir_in(&parent)
        .map_err(|e| Error::io(&parent, e))?;
    let made = write(staging.path())?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        // tempdir makes it private (0700); an adapter directory is meant to be shared and served.
        std::fs::set_permissions(staging.path(), std::fs::Permissions::from_mode(0o755))
            .map_err(|e| Error::io(staging.path(), e))?;
    }
    sync_dir(staging.path());
    let staged = staging.keep();
    let result = if !dst.exists() {
        std::fs::rename(&staged, dst).map_err(|e| Error::io(dst, e))
    } else if exchange(&staged, dst) {
        // `staged` now holds the old directory.
        std::fs::remove_dir_all(&staged).map_err(|e| Error::io(&staged, e))
    } else {
        // No atomic exchange here: move the old one aside first. A crash between the renames
        // leaves the old directory complete under its hidden name.
        let old = parent.join(format!(
            "{}{}-old",
            staging_prefix(&name),
            std::process::id()
        ));
        std::fs::rename(dst, &old)
            .map_err(|e| Error::io(dst, e))
            .and_then(|_| match std::fs::rename(&staged, dst) {
                Ok(()) => std::fs::remove_dir_all(&old).map_err(|e| Error::io(&old, e)),
                Err(e) => {
                    let _ = std::fs::rename(&old, dst);
                    Err(Error::io(dst, e))
                }
            })
    };
    if result.is_err() && staged.exists() {
        let _ = std::fs::remove_dir_all(&staged);
    }
    sync_dir(&parent);
    result.map(|()| made)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn safetensors_are_read_tensor_by_tensor_with_the_format_checks() {
        use candle_core::{Device, Tensor};
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t.safetensors");
        let dev = Device::Cpu;
        let tensors = std::collections::HashMap::from([
            (
                "w".to_string(),
                Tensor::arange(0f32, 12.0, &dev)
                    .unwrap()
                    .reshape((3, 4))
                    .unwrap(),
            ),
            ("ids".to_string(), Tensor::new(&[7u32, 8, 9], &dev).unwrap()),
            ("h".to_string(), Tensor::new(&[1.5f64, -2.0], &dev).unwrap()),
            (
                "b".to_string(),
                Tensor::new(&[0.25f32], &dev)
                    .unwrap()
                    .to_dtype(candle_core::DType::BF16)
                    .unwrap(),
            ),
        ]);
        candle_core::safetensors::save(&tensors, &p).unwrap();
        let got = read_safetensors(&p, &dev).unwrap();
        assert_eq!(got.len(), tensors.len());
        for (name, want) in &tensors {
            let t = &got[name];
            assert_eq!((t.dtype(), t.dims()), (want.dtype(), want.dims()), "{name}");
            let values = |t: &Tensor| {
                let t = t.to_dtype(candle_core::DType::F64).unwrap();
                t.flatten_all().unwrap().to_vec1::<f64>().unwrap()
            };
            assert_eq!(values(t), values(want), "{name}");
        }
        let bytes = std::fs::read(&p).unwrap();
        let cut = bytes.len() - 1;
        for (what, data) in [
            ("truncated", bytes[..cut].to_vec()),
            ("extended", [&bytes[..], &[0]].concat()),
            ("shorter than a header", bytes[..5].to_vec()),
            ("header longer than the file", {
                let mut b = bytes.clone();
                b[..8].copy_from_slice(&(bytes.len() as u64).to_le_bytes());
                b
            }),
        ] {
            std::fs::write(&p, data).unwrap();
            assert!(read_safetensors(&p, &dev).is_err(), "{what}");
        }
    }

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

    #[cfg(target_os = "linux")]
    #[test]
    fn a_save_removes_what_killed_saves_left_and_keeps_what_live_ones_use() {
        let parent = tempfile::tempdir().unwrap();
        let dst = parent.path().join("task");
        let mut child = std::process::Command::new("true").spawn().unwrap();
        child.wait().unwrap();
        let (dead, live) = (child.id(), std::process::id());
        let stray = [
            format!("{PROBE_PREFIX}{dead}-x1"),
            format!(".task.adapterkit-{dead}-x2"),
        ];
        let kept = [
            format!("{PROBE_PREFIX}{live}-y1"),
            format!(".task.adapterkit-{live}-y2"),
            format!("{PROBE_PREFIX}nopid"),
        ];
        for n in stray.iter().chain(&kept) {
            if n.contains("probe") {
                std::fs::write(parent.path().join(n), b"").unwrap();
            } else {
                std::fs::create_dir(parent.path().join(n)).unwrap();
            }
        }
        replace_dir(&dst, &|_| true, |d| write_atomic(&d.join("a"), b"1")).unwrap();
        let mut names: Vec<String> = std::fs::read_dir(parent.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        let mut want: Vec<String> = kept.to_vec();
        want.push("task".into());
        want.sort();
        assert_eq!(names, want);
    }
}
