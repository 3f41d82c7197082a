use clap::Parser;
use kvcache_server::config::settings::Settings;

fn main() -> anyhow::Result<()> {
    kvcache_server::cli::run(Settings::parse())
}
