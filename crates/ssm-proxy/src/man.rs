//! `man`: the man pages, generated from the command line definition.

/// `man`: the top-level page on standard output, or every page (ssm-proxy.1,
/// ssm-proxy-start.1, ...) written into `dir`.
pub fn run(cli: clap::Command, dir: Option<std::path::PathBuf>) -> anyhow::Result<()> {
    use anyhow::Context;
    match dir {
        None => {
            let mut out = Vec::new();
            clap_mangen::Man::new(cli).render(&mut out)?;
            std::io::Write::write_all(&mut std::io::stdout(), &out)?;
        }
        Some(dir) => {
            std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
            clap_mangen::generate_to(cli, &dir)
                .with_context(|| format!("cannot write the man pages into {}", dir.display()))?;
            println!("man pages written to {}", dir.display());
        }
    }
    Ok(())
}
