//! `swk report SESSION.json [--out report.html]`: re-render a research session's HTML.

use std::path::PathBuf;

use swk::{Error, Result};

/// Arguments of `swk report`.
#[derive(clap::Args)]
pub struct Args {
    /// A session.json written by `swk research`.
    session: PathBuf,
    /// Where to write the page (default: report.html next to the session).
    #[arg(long)]
    out: Option<PathBuf>,
}

pub fn run(a: Args) -> Result<()> {
    let text = std::fs::read_to_string(&a.session).map_err(|e| Error::io(&a.session, e))?;
    let s: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| Error::Json { path: a.session.clone(), source: e })?;
    if s.get("detect").is_none() || s.get("model").is_none() {
        return Err(Error::format(
            &a.session,
            "not a session.json of `swk research` (no `detect`)",
        ));
    }
    let out = a.out.clone().unwrap_or_else(|| a.session.with_file_name("report.html"));
    std::fs::write(&out, swk::report::session_html(&s)).map_err(|e| Error::io(&out, e))?;
    println!("{}", out.display());
    Ok(())
}
