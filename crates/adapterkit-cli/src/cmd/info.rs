//! `adapterkit info`: parameter counts and sizes of a base model and an adapter.

use super::*;

#[derive(Args)]
pub(crate) struct InfoArgs {
    /// Adapter directory to describe.
    #[arg(long)]
    adapter: Option<PathBuf>,
    /// Base model directory [default: the cached all-MiniLM-L6-v2].
    #[arg(long)]
    model: Option<PathBuf>,
}

pub(crate) fn info(a: InfoArgs) -> Result<()> {
    let base = load_base(&a.model)?;
    let base_params = base.num_params();
    let mut v = json!({
        "model": base.dir,
        "model_type": base.config.model_type,
        "layers": base.config.num_hidden_layers,
        "hidden_size": base.config.hidden_size,
        "base_params": base_params,
    });
    if let Some(dir) = &a.adapter {
        let task = load_task(&base, dir)?;
        let n = task.num_params();
        v["adapter"] = json!({
            "dir": dir,
            "name": task.name,
            "method": task.trainable.label(),
            "adapter": task.adapter,
            "lora": task.lora,
            "prefix": task.prefix,
            "head": task.head,
            "trainable_params": n,
            "percent_of_base": 100.0 * n as f64 / base_params as f64,
            "bytes_on_disk": adapterkit::format::dir_size(dir)?,
        });
    }
    println!("{}", serde_json::to_string_pretty(&v)?);
    Ok(())
}
