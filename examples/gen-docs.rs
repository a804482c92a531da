//! Regenerates the files written from one definition in the code, so that a
//! change is one edit plus this command:
//!
//!     cargo run --example gen-docs
//!
//! writes `config/echod.toml` (every key, its default and its comment) and
//! the key table in `README.md`, from `echod::config::keys`, and the README's
//! signal table from `echod::master::signals` (each table between its
//! markers). The unit tests `the_committed_copies_are_what_the_generator_writes`
//! and `the_readmes_signal_table_is_what_the_generator_writes` fail while a
//! copy differs from what this writes.

use std::fs;
use std::io;
use std::path::Path;

use echod::config::keys;
use echod::master::signals;

fn main() -> io::Result<()> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    fs::write(root.join("config/echod.toml"), keys::render_toml())?;
    let readme_path = root.join("README.md");
    let mut readme = fs::read_to_string(&readme_path)?;
    readme = replace_between(&readme, keys::TABLE_BEGIN, keys::TABLE_END, &keys::render_table())?;
    readme = replace_between(&readme, signals::TABLE_BEGIN, signals::TABLE_END, &signals::render_table())?;
    fs::write(&readme_path, readme)?;
    println!("wrote config/echod.toml and README.md's key and signal tables");
    Ok(())
}

/// `text` with what stands between `begin` and `end` replaced by `new`.
fn replace_between(text: &str, begin: &str, end: &str, new: &str) -> io::Result<String> {
    let missing = || io::Error::other(format!("README.md lacks the markers {begin:?} ... {end:?}"));
    let from = text.find(begin).ok_or_else(missing)? + begin.len();
    let to = text[from..].find(end).ok_or_else(missing)? + from;
    Ok(format!("{}{new}{}", &text[..from], &text[to..]))
}
