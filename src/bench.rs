//! `natter bench`: write-path measurements.

/// `natter bench` arguments.
#[derive(Debug, clap::Args)]
pub struct BenchArgs {}

pub async fn run(_args: BenchArgs) -> anyhow::Result<()> {
    Ok(())
}
