//! Regenerates the files written from one definition in the code, so that a
//! change is one edit plus this command:
//!
//!     cargo run --example gen-docs
//!
//! writes `config/echod.toml` (every key, its default and its comment) and
//! the key table in `README.md` (between its markers), from
//! `echod::config::keys`. The unit test
//! `the_committed_copies_are_what_the_generator_writes` fails while either
//! differs from what this writes.

use std::fs;
use std::io;
use std::path::Path;

use echod::config::keys::{self, TABLE_BEGIN, TABLE_END};

fn main() -> io::Result<()> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    fs::write(root.join("config/echod.toml"), keys::render_toml())?;
    let readme_path = root.join("README.md");
    let readme = fs::read_to_string(&readme_path)?;
    let Some(old) = keys::between(&readme, TABLE_BEGIN, TABLE_END) else {
        return Err(io::Error::other(format!("README.md lacks the markers {TABLE_BEGIN:?} ... {TABLE_END:?}")));
    };
    let at = readme.find(old).unwrap_or_default();
    let new = format!("{}{}{}", &readme[..at], keys::render_table(), &readme[at + old.len()..]);
    fs::write(&readme_path, new)?;
    println!("wrote config/echod.toml and README.md's key table");
    Ok(())
}
