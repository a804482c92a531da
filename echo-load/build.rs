//! Build script: records the git commit the binaries are built from, for
//! `echod --version` and `echo-load --version`.
//!
//! `ECHOD_GIT_COMMIT` in the build environment wins (for builds from a source
//! tarball, where there is no .git); otherwise `git rev-parse` is asked, and
//! "unknown" is used when neither answers. Only the files that move when the
//! commit changes are watched, so ordinary rebuilds do not rerun this.

use std::path::Path;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=ECHOD_GIT_COMMIT");
    let commit = std::env::var("ECHOD_GIT_COMMIT").ok().filter(|c| !c.is_empty()).or_else(git_commit);
    println!("cargo:rustc-env=ECHOD_GIT_COMMIT={}", commit.as_deref().unwrap_or("unknown"));
}

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).output().ok()?;
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn git_commit() -> Option<String> {
    let commit = git(&["rev-parse", "--short=12", "HEAD"])?;
    if let Some(dir) = git(&["rev-parse", "--git-dir"]) {
        let dir = Path::new(&dir);
        let mut watch = vec![dir.join("HEAD"), dir.join("packed-refs")];
        if let Some(head) = git(&["symbolic-ref", "-q", "HEAD"]) {
            watch.push(dir.join(head));
        }
        for path in watch.iter().filter(|p| p.exists()) {
            println!("cargo:rerun-if-changed={}", path.display());
        }
    }
    Some(commit)
}
