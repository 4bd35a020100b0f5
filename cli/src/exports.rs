//! Writing the profile exports (`--pprof`, `--collapsed`, `--flamegraph`) of one or more
//! processes: `%p` in a name is the process's pid; without it, the first process writes the
//! name given and every other NAME.<pid> (as `--xml-file`).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use crate::profile::Profile;

/// Where the exports go (each optional).
#[derive(Clone, Debug, Default)]
pub struct Targets {
    pub pprof: Option<PathBuf>,
    pub collapsed: Option<PathBuf>,
    pub flamegraph: Option<PathBuf>,
}

impl Targets {
    /// Whether any export is asked for (profiles are built only then).
    pub fn any(&self) -> bool {
        self.pprof.is_some() || self.collapsed.is_some() || self.flamegraph.is_some()
    }
}

/// Writes every export asked for, of each profile (the program's first); `title` heads the
/// flame graphs.
pub fn write(t: &Targets, profiles: &[&Profile], title: &str) -> Result<()> {
    let dest = |path: &Path, p: &Profile, i: usize| crate::xml::path_for(path, p.pid, i == 0);
    for (i, p) in profiles.iter().enumerate() {
        if let Some(path) = &t.pprof {
            let d = dest(path, p, i);
            let bytes = crate::pprof::render(p).context("compressing the pprof profile")?;
            crate::outfile::write(&d, &bytes, 0o644)
                .with_context(|| format!("writing {}", d.display()))?;
        }
        if let Some(path) = &t.collapsed {
            let d = dest(path, p, i);
            crate::outfile::write(&d, crate::flame::folded(p).as_bytes(), 0o644)
                .with_context(|| format!("writing {}", d.display()))?;
        }
        if let Some(path) = &t.flamegraph {
            let d = dest(path, p, i);
            let svg = crate::flame::svg(p, title).context("drawing the flame graph")?;
            crate::outfile::write(&d, &svg, 0o644)
                .with_context(|| format!("writing {}", d.display()))?;
        }
    }
    Ok(())
}
