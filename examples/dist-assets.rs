//! Generates the files a package ships besides the binaries: a man page per
//! binary and shell completions for bash, zsh and fish, from the same clap
//! definitions the binaries parse (`echod::cli`, `echo_load::cli`), so they never drift.
//!
//!     cargo run --release --example dist-assets -- target/assets
//!
//! writes `man/echod.8`, `man/echo-load.1`, and `completions/{echod,echo-load}.bash`,
//! `completions/_{echod,echo-load}` (zsh), `completions/{echod,echo-load}.fish`.
//! `debian/build.sh` runs it before `cargo deb`.

use std::fs;
use std::io;
use std::path::Path;

use clap::CommandFactory;
use clap_complete::Shell;
use echo_load::cli::EchoLoadCli;
use echod::cli::EchodCli;

fn main() -> io::Result<()> {
    let out = std::env::args().nth(1).unwrap_or_else(|| "target/assets".into());
    let out = Path::new(&out);
    fs::create_dir_all(out.join("man"))?;
    fs::create_dir_all(out.join("completions"))?;
    // The daemon is a system administration command (section 8); the load
    // harness a user command (section 1).
    for (cmd, section) in [(EchodCli::command(), "8"), (EchoLoadCli::command(), "1")] {
        let name = cmd.get_name().to_string();
        let mut page = Vec::new();
        clap_mangen::Man::new(cmd.clone()).section(section).render(&mut page)?;
        fs::write(out.join("man").join(format!("{name}.{section}")), page)?;
        for (shell, file) in [
            (Shell::Bash, format!("{name}.bash")),
            (Shell::Zsh, format!("_{name}")),
            (Shell::Fish, format!("{name}.fish")),
        ] {
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut cmd.clone(), &name, &mut script);
            fs::write(out.join("completions").join(file), script)?;
        }
    }
    println!("wrote man pages and completions to {}", out.display());
    Ok(())
}
