//! `cargo xtask run ARGS...`: build, then `enforcer-agent run ARGS...` in the foreground.

use std::{path::Path, process::Command};

use anyhow::Result;

use crate::{
    build::build,
    cmd::{require_root, status, step},
};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Arguments of `enforcer-agent run`, flags included (see `enforcer-agent run --help`).
    #[arg(
        trailing_var_arg = true,
        allow_hyphen_values = true,
        value_name = "ARGS"
    )]
    pub args: Vec<String>,
}

pub fn run(root: &Path, args: &Args) -> Result<()> {
    build(root)?;
    require_root("`cargo xtask run`")?;
    let bin = root.join("target").join("release").join("enforcer-agent");
    step(&format!(
        "starting {} run {}",
        bin.display(),
        args.args.join(" ")
    ));
    let mut c = Command::new(&bin);
    c.arg("run").args(&args.args);
    status(c, "enforcer-agent run")
}
