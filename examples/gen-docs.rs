//! Regenerates the files written from one definition in the code, so that a
//! change is one edit plus this command:
//!
//!     cargo run --example gen-docs
//!
//! writes `config/echod.toml` (every key, its default and its comment) and
//! the key table in `README.md`, from `echod::config::keys`, and the README's
//! signal table from `echod::master::signals` (each table between its
//! markers), and docs/OPERATIONS.md's metric table from
//! `echod::metrics::families`. The unit tests
//! `the_committed_copies_are_what_the_generator_writes`,
//! `the_readmes_signal_table_is_what_the_generator_writes` and
//! `the_docs_name_the_families_as_they_are` fail while a copy differs from
//! what this writes.

use std::fs;
use std::io;
use std::path::Path;

use echod::config::keys;
use echod::master::signals;
use echod::metrics::families;

fn main() -> io::Result<()> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    fs::write(root.join("config/echod.toml"), keys::render_toml())?;
    let readme_path = root.join("README.md");
    let mut readme = fs::read_to_string(&readme_path)?;
    readme = replace_between(&readme, keys::TABLE_BEGIN, keys::TABLE_END, &keys::render_table())?;
    readme = replace_between(&readme, signals::TABLE_BEGIN, signals::TABLE_END, &signals::render_table())?;
    fs::write(&readme_path, readme)?;
    let ops_path = root.join("docs/OPERATIONS.md");
    let ops = fs::read_to_string(&ops_path)?;
    fs::write(
        &ops_path,
        replace_between(&ops, families::TABLE_BEGIN, families::TABLE_END, &families::render_table())?,
    )?;
    println!("wrote config/echod.toml, README.md's key and signal tables and docs/OPERATIONS.md's metric table");
    Ok(())
}

/// `text` with what stands between `begin` and `end` replaced by `new`.
fn replace_between(text: &str, begin: &str, end: &str, new: &str) -> io::Result<String> {
    let missing = || io::Error::other(format!("no markers {begin:?} ... {end:?}"));
    let from = text.find(begin).ok_or_else(missing)? + begin.len();
    let to = text[from..].find(end).ok_or_else(missing)? + from;
    Ok(format!("{}{new}{}", &text[..from], &text[to..]))
}
