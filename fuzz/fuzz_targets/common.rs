/// A scratch file of this process in memory-backed storage, rewritten for every input.
pub fn scratch(name: &str) -> std::path::PathBuf {
    let dir = if std::path::Path::new("/dev/shm").is_dir() {
        std::path::PathBuf::from("/dev/shm")
    } else {
        std::env::temp_dir()
    };
    dir.join(format!("ak-fuzz-{}-{name}", std::process::id()))
}
