//! Records the git revision the binary is built from, so a suite run records the code that
//! actually trained it (a binary copied elsewhere keeps running while HEAD moves on).

use std::process::Command;

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn main() {
    // Rerun when the checkout moves to another commit or the sources change (for the dirty mark).
    if let Some(dir) = git(&["rev-parse", "--absolute-git-dir"]) {
        println!("cargo:rerun-if-changed={dir}/HEAD");
        println!("cargo:rerun-if-changed={dir}/packed-refs");
        if let Some(r) = git(&["symbolic-ref", "-q", "HEAD"]) {
            println!("cargo:rerun-if-changed={dir}/{r}");
        }
    }
    println!("cargo:rerun-if-changed=src");
    println!("cargo:rerun-if-changed=../adapterkit/src");
    let rev = match git(&["rev-parse", "--short", "HEAD"]) {
        Some(r) => {
            let dirty = git(&["status", "--porcelain", "--untracked-files=no", "--", ".."])
                .is_some_and(|s| !s.is_empty());
            if dirty {
                format!("{r}+dirty")
            } else {
                r
            }
        }
        None => "unknown".to_string(),
    };
    println!("cargo:rustc-env=ADAPTERKIT_BUILD_REVISION={rev}");
}
