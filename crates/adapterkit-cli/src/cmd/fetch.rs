//! `adapterkit fetch`: the real model and data sets into the asset cache.

use super::*;

pub(crate) fn fetch() -> Result<()> {
    let home = adapterkit::default_home();
    std::fs::create_dir_all(&home).with_context(|| format!("creating {}", home.display()))?;
    let script = home.join(".fetch_assets.py");
    adapterkit::io::write_atomic(&script, adapterkit::FETCH_SCRIPT.as_bytes())?;
    let status = std::process::Command::new("python3")
        .arg(&script)
        .env("ADAPTERKIT_HOME", &home)
        .status()
        .context("running python3 (needed for pip, which downloads from PyPI)")?;
    if !status.success() {
        bail!("fetching assets failed ({status})");
    }
    Ok(())
}
