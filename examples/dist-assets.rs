//! Generates the files a package ships besides the binaries: a man page per
//! binary and shell completions for bash, zsh and fish, from the same clap
//! definitions the binaries parse (`echod::cli`, `echo_load::cli`), so they never drift.
//!
//!     cargo run --release --example dist-assets -- target/assets
//!
//! writes `man/echod.8` (with SIGNALS from the master's table),
//! `man/echod.toml.5` (every key, from `echod::config::keys`),
//! `man/echo-load.1`, and `completions/{echod,echo-load}.bash`,
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
    fs::write(out.join("man/echod.8"), echod_page()?)?;
    fs::write(out.join("man/echod.toml.5"), echod::config::keys::render_man())?;
    for (cmd, section) in [(EchodCli::command(), "8"), (EchoLoadCli::command(), "1")] {
        let name = cmd.get_name().to_string();
        if section == "1" {
            let mut page = Vec::new();
            clap_mangen::Man::new(cmd.clone()).section(section).render(&mut page)?;
            fs::write(out.join("man").join(format!("{name}.{section}")), page)?;
        }
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

/// echod(8) in the shape of nginx(8): clap's NAME, SYNOPSIS, DESCRIPTION
/// and OPTIONS, then SIGNALS from the master's own table, FILES,
/// ENVIRONMENT, EXIT STATUS and SEE ALSO (not clap's "EXTRA", which is what
/// `--help` shows after the flags).
fn echod_page() -> io::Result<Vec<u8>> {
    use echod::config::keys::roff_text;
    let man = clap_mangen::Man::new(EchodCli::command()).section("8");
    let mut page = Vec::new();
    man.render_title(&mut page)?;
    man.render_name_section(&mut page)?;
    man.render_synopsis_section(&mut page)?;
    man.render_description_section(&mut page)?;
    man.render_options_section(&mut page)?;
    let mut roff = String::from(
        ".SH SIGNALS\nSent to the master process; workers ignore signals and act on what the master tells them.\n",
    );
    for d in echod::master::signals::TABLE {
        let command = d.command.map_or(String::new(), |c| format!(" (\\fBechod \\-s {c}\\fR)"));
        roff.push_str(&format!(".TP\n\\fB{}\\fR{command}\n{}\n", d.names.join(", "), roff_text(d.doc)));
    }
    roff.push_str(concat!(
        ".SH FILES\n",
        ".TP\n\\fIconfig/echod.toml\\fR\nWithout \\fB\\-\\-config\\fR: used if it exists (relative to the working directory).\n",
        ".TP\n\\fI/etc/echod/echod.toml\\fR\nThe packaged configuration, described key by key in \\fBechod.toml\\fR(5); without \\fB\\-\\-config\\fR, used when there is no \\fIconfig/echod.toml\\fR, so \\fBechod \\-\\-check\\-config\\fR checks the file the unit runs.\n",
        ".SH ENVIRONMENT\n",
        ".TP\n\\fBRUST_LOG\\fR\nThe log filter (env_logger syntax); when set it wins over \\fBlog_level\\fR.\n",
        ".TP\n\\fBNOTIFY_SOCKET\\fR\nSet by systemd (Type=notify): echod reports READY=1, RELOADING=1, STOPPING=1, STATUS=, MAINPID= and watchdog pings there, from the main process only.\n",
        ".TP\n\\fBWATCHDOG_USEC\\fR\nSet by systemd (WatchdogSec=): echod pings at half the period.\n",
        ".TP\n\\fBLISTEN_FDS\\fR, \\fBLISTEN_PID\\fR, \\fBLISTEN_FDNAMES\\fR\nSocket activation (echod.socket) and sockets handed back from systemd's fd store; a socket named \\fBmetrics\\fR serves /metrics.\n",
        ".TP\n\\fBJOURNAL_STREAM\\fR\nSet by systemd when stderr is the journal: log lines carry <N> priority prefixes instead of timestamps.\n",
        ".TP\n\\fBECHOD_GIT_COMMIT\\fR\nAt build time only: the commit \\fB\\-\\-version\\fR names, for builds without .git.\n",
        ".SH EXIT STATUS\n",
        "0 after a stop; 78 (EX_CONFIG) for a bad config file or flag, with a message that names the file, the line and the key, before anything starts; 1 when a listen address cannot be bound; 71 for other start\\-up failures.\n",
        ".SH EXAMPLES\n",
        ".nf\necho 'listen = [\"127.0.0.1:7007\"]' > /tmp/e.toml\nechod \\-\\-config /tmp/e.toml \\-\\-check\\-config\nsystemctl reload echod        # SIGHUP: reload\nkill \\-USR2 $MAINPID            # binary upgrade\n.fi\n",
        ".SH SEE ALSO\n\\fBechod.toml\\fR(5), \\fBecho\\-load\\fR(1), \\fBsystemd.service\\fR(5), \\fBhaproxy\\fR(1)\n",
    ));
    page.extend_from_slice(roff.as_bytes());
    man.render_version_section(&mut page)?;
    Ok(page)
}
