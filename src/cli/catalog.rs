//! `swk catalog [--json]`: the published super weights swk knows.

use swk::{catalog, Result};

/// Arguments of `swk catalog`.
#[derive(clap::Args)]
pub struct Args {
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

pub fn run(a: Args) -> Result<()> {
    let entries = catalog::entries()?;
    if a.json {
        return super::print_json(&entries);
    }
    println!("{:<36} {:<42} source", "model", "(layer, row, col)");
    for e in entries {
        let coords: Vec<String> =
            e.coordinates.iter().map(|c| format!("({}, {}, {})", c[0], c[1], c[2])).collect();
        println!("{:<36} {:<42} {}", e.model, coords.join(" "), e.source);
    }
    Ok(())
}
