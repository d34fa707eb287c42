//! `ztgate demo` (placeholder until the demo lands).
pub struct DemoOptions {
    pub kubeconfig_out: Option<std::path::PathBuf>,
    pub dir: Option<std::path::PathBuf>,
    pub port: u16,
}

pub async fn run(_o: DemoOptions) -> Result<(), String> {
    Err("not yet".into())
}
