//! `kindling images` on its own, for working on this crate without the root binary:
//! `cargo run -p kindling-images --example images -- build --runtime provided`.

use clap::Parser;
use kindling_images::cli::ImagesCommand;

#[derive(Parser)]
struct Args {
    #[command(subcommand)]
    command: ImagesCommand,
}

fn main() -> anyhow::Result<()> {
    Args::parse().command.run()
}
