//! Orphan sites of lost blocks (`leakhunt run --orphans`): at each free the process sends the
//! words of the freed block that look like heap pointers, with the free's stack; this side notes
//! which live blocks each freed block still pointed to. A block lost at exit whose last holder
//! was freed is reported with that holder's allocation and free stacks and the member that was
//! not freed; where the same free site freed that member for other parents, the report says so
//! instead of offering a second free.

use rustc_hash::FxHashMap;
use serde::Serialize;

use crate::report::Frame;

/// Where a lost record's blocks lost their last holder.
#[derive(Serialize, Clone, Debug, Default)]
pub struct Orphaned {
    /// Blocks of the record orphaned at this site, and their share of the record.
    pub blocks: u64,
    pub share: f64,
    /// The holder's allocation stack and the stack of its free.
    pub parent: Vec<Frame>,
    pub freed_at: Vec<Frame>,
    /// The pointer's offset in the holder, and the member there where DWARF says.
    pub offset: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub member: Option<String>,
    /// Holders freed at that site whose member at that offset had been freed before them, by
    /// where: the member is freed on some paths only.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub member_freed_before: Vec<FreedBefore>,
    /// Holders freed at that site still pointing at a live block there.
    pub holders_orphaning: u64,
    /// Of those blocks, how many were freed later (by another owner): then no patch is offered.
    pub handed_on: u64,
    /// The fix as a unified diff against the free site's source (a suggestion), when the member
    /// is never freed before its holder and the source reads as expected.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub patch: Option<String>,
}

/// Holders whose member was freed before them, at this stack.
#[derive(Serialize, Clone, Debug, Default)]
pub struct FreedBefore {
    pub stack: Vec<Frame>,
    pub holders: u64,
}

/// The record's lines about its orphan site.
pub fn lines(o: &Orphaned) -> Vec<String> {
    let parent = site_words(&o.parent);
    let freed = site_words(&o.freed_at);
    let member = member_words(o);
    let mut out = vec![format!(
        "{} of these blocks ({:.0}%) were orphaned when their holder (allocated at {parent}) was freed at {freed}: {member} was not freed",
        crate::report::thousands(o.blocks),
        o.share * 100.0
    )];
    for f in &o.member_freed_before {
        out.push(format!(
            "  (for {} other holders freed there, {member} was freed before, at {})",
            crate::report::thousands(f.holders),
            site_words(&f.stack)
        ));
    }
    if o.handed_on > 0 {
        out.push(format!(
            "  ({} other blocks their holders left there were freed later by another owner: no patch offered)",
            crate::report::thousands(o.handed_on)
        ));
    }
    if let Some(p) = &o.patch {
        out.push("Suggested fix (check it before applying):".into());
        out.extend(p.lines().map(|l| format!("  {l}")));
    }
    out
}

fn member_words(o: &Orphaned) -> String {
    match &o.member {
        Some(m) => format!("the member at offset {:#x} (`{m}`)", o.offset),
        None => format!("the pointer at offset {:#x}", o.offset),
    }
}

/// Root-cause advice for blocks orphaned at `o`, made at `at`.
pub fn guidance(o: &Orphaned, at: &str) -> String {
    let freed = site_words(&o.freed_at);
    let member = member_words(o);
    if let Some(f) = o.member_freed_before.first() {
        let freed_before = o
            .member_freed_before
            .iter()
            .fold(0u64, |a, f| a.saturating_add(f.holders));
        return format!(
            "Blocks made at {at} are lost when their holder is freed at {freed} with {member} still set: \
             for {} holders it was freed before (at {}), for {} it was not. Look for the path that skips \
             that free (an early return, an error branch) rather than adding a second free at {freed}.",
            crate::report::thousands(freed_before),
            site_words(&f.stack),
            crate::report::thousands(o.holders_orphaning)
        );
    }
    format!(
        "Blocks made at {at} are lost when their holder is freed at {freed} without freeing {member}: \
         free it there, before the holder{}.",
        if o.patch.is_some() { " (the patch above)" } else { "" }
    )
}

fn site_words(stack: &[Frame]) -> String {
    crate::paths::site_words(stack)
}

/// What `--orphans` learned while reading the stream: which freed block last held each live
/// block, and, per free site, what its parents' members had become.
#[derive(Default, Debug)]
pub struct Orphans {
    /// Per thread, the `CONTENT` record just decoded, waiting for the `FREE` after it: (block,
    /// free stack, pairs).
    staged: FxHashMap<u32, Words>,
    /// The words of a block by the sequence number of its `FREE`, until that `FREE` is applied
    /// (in sequence order, when the live set is that of the free): (block, free stack, pairs).
    pending: FxHashMap<u64, Words>,
    /// Live block -> the last freed block that pointed at it: (holder's allocation stack, the
    /// holder's free stack, the pointer's offset in the holder).
    pub holder: FxHashMap<u64, (u32, u32, u32)>,
    /// Freed addresses not allocated again: the stack of their free.
    dead: FxHashMap<u64, u32>,
    /// Per (holder's free stack, holder's allocation stack, offset): how many holders freed there
    /// still pointed at a live block at that offset, and how many at a block freed before
    /// (by the stack of that free).
    pub sites: FxHashMap<(u32, u32, u32), SiteStats>,
}

/// A freed block's words: (the block, its free's stack, (offset, word) pairs).
type Words = (u64, u32, Vec<(u64, u64)>);

/// What the holders freed at one site had at one offset.
#[derive(Default, Debug, Clone)]
pub struct SiteStats {
    /// The last holder's size.
    pub size: u64,
    /// A live block (it may have been freed later, by its new owner).
    pub live: u64,
    /// A block freed before the holder: by the stack of that free.
    pub freed_before: FxHashMap<u32, u64>,
}

impl Orphans {
    /// A `CONTENT` record of thread `tid`: block `addr` is about to be freed at `free_stack`
    /// with these words (its `FREE` comes next in that thread's stream).
    pub fn stage(&mut self, tid: u32, addr: u64, free_stack: u32, pairs: &[(u64, u64)]) {
        self.staged.insert(tid, (addr, free_stack, pairs.to_vec()));
    }

    /// Thread `tid`'s `FREE` of `addr` has sequence number `seq`: the record staged for it goes
    /// with it.
    pub fn attach(&mut self, tid: u32, seq: u64, addr: u64) {
        if let Some(c) = self.staged.remove(&tid) {
            if c.0 == addr {
                self.pending.insert(seq, c);
            }
        }
    }

    /// Block `addr` (`size` bytes from `stack`, or unknown) is freed now by the event of
    /// sequence number `seq`, the live set as it was just before.
    pub fn free(
        &mut self,
        addr: u64,
        seq: u64,
        parent: Option<(u64, u32)>,
        live: &crate::liveset::LiveSet,
    ) {
        self.holder.remove(&addr);
        let Some((at, free_stack, pairs)) = self.pending.remove(&seq) else {
            return;
        };
        if at != addr {
            return;
        }
        if let Some((size, stack)) = parent {
            for (off, w) in pairs {
                // The allocator's slack past the requested size is not the program's.
                if off >= size || w == addr {
                    continue;
                }
                let key = (free_stack, stack, off as u32);
                self.sites.entry(key).or_default().size = size;
                if live.contains_key(w) {
                    self.holder.insert(w, key_holder(key));
                    self.sites.entry(key).or_default().live += 1;
                } else if let Some(&f) = self.dead.get(&w) {
                    *self
                        .sites
                        .entry(key)
                        .or_default()
                        .freed_before
                        .entry(f)
                        .or_default() += 1;
                }
            }
        }
        self.dead.insert(addr, free_stack);
    }

    /// Block `addr` is allocated (again).
    pub fn alloc(&mut self, addr: u64) {
        self.dead.remove(&addr);
        self.holder.remove(&addr);
    }
}

fn key_holder((free_stack, stack, off): (u32, u32, u32)) -> (u32, u32, u32) {
    (stack, free_stack, off)
}

/// The orphan site of the lost blocks of one record: `addrs` its blocks.
pub fn orphaned(
    namer: &mut crate::paths::Namer,
    o: &Orphans,
    addrs: &[u64],
    alloc_fn: Option<leakhunt_format::AllocFn>,
) -> Option<Orphaned> {
    let mut by: FxHashMap<(u32, u32, u32), u64> = FxHashMap::default();
    for a in addrs {
        if let Some(&h) = o.holder.get(a) {
            *by.entry(h).or_default() += 1;
        }
    }
    let (&(parent, free_stack, off), &blocks) = by
        .iter()
        .max_by_key(|(k, n)| (**n, std::cmp::Reverse(**k)))?;
    let stats = o
        .sites
        .get(&(free_stack, parent, off))
        .cloned()
        .unwrap_or_default();
    let parent_frames = namer.frames(parent);
    let freed_at = namer.frames(free_stack);
    let member = namer.member_of(&parent_frames, stats.size, off as u64);
    let mut member_freed_before: Vec<FreedBefore> = stats
        .freed_before
        .iter()
        .map(|(&s, &n)| FreedBefore {
            stack: namer.frames(s),
            holders: n,
        })
        .collect();
    member_freed_before.sort_by_key(|f| std::cmp::Reverse(f.holders));
    // Every block the holders left live at this site must be among the lost: one freed later
    // had another owner by then, and freeing it with the holder would free it under that one.
    let handed_on = stats.live.saturating_sub(blocks);
    let patch = if member_freed_before.is_empty() && handed_on == 0 {
        member
            .as_deref()
            .and_then(|m| patch_at(&freed_at, m, alloc_fn))
    } else {
        None
    };
    Some(Orphaned {
        blocks,
        share: blocks as f64 / addrs.len().max(1) as f64,
        parent: parent_frames,
        freed_at,
        offset: off as u64,
        member,
        member_freed_before,
        holders_orphaning: stats.live,
        handed_on,
        patch,
    })
}

/// A source file's text, if it is a regular file of at most 16 MiB (a path from DWARF can name
/// anything: a FIFO must not hang the report, a device fill memory).
fn read_source(path: &str) -> Option<String> {
    read_regular(path, 16 << 20)
}

/// A file's text, if it is a regular file of at most `max` bytes (never a FIFO's wait or a
/// device's endless bytes).
pub fn read_regular(path: &str, max: u64) -> Option<String> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_NONBLOCK)
        .open(path)
        .ok()?;
    let meta = f.metadata().ok()?;
    if !meta.is_file() || meta.len() > max {
        return None;
    }
    let mut text = String::new();
    f.take(max).read_to_string(&mut text).ok()?;
    Some(text)
}

/// A unified diff that frees `member` of the holder just before the free at `freed_at`'s first
/// frame with source: that line must read `free(EXPR);` (or `delete EXPR;`), the member be a C
/// member path, and the file readable. The freeing call matches how the member was allocated.
fn patch_at(
    freed_at: &[Frame],
    member: &str,
    alloc_fn: Option<leakhunt_format::AllocFn>,
) -> Option<String> {
    use leakhunt_format::AllocFn;
    if !member
        .split('.')
        .all(|p| !p.is_empty() && p.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'_'))
    {
        return None;
    }
    let f = crate::growth::first_source(freed_at)?;
    let (file, line) = (f.file.as_deref()?, f.line? as usize);
    let text = read_source(file)?;
    let lines: Vec<&str> = text.lines().collect();
    let at = lines.get(line.checked_sub(1)?)?;
    let indent: String = at.chars().take_while(|c| c.is_whitespace()).collect();
    // The statement, without a comment after it.
    let code = match (at.find("//"), at.find("/*")) {
        (Some(a), Some(b)) => &at[..a.min(b)],
        (Some(a), None) | (None, Some(a)) => &at[..a],
        (None, None) => at,
    };
    let body = code.trim();
    let expr = if let Some(rest) = body.strip_prefix("free(") {
        rest.strip_suffix(");")?.trim()
    } else if let Some(rest) = body.strip_prefix("delete ") {
        rest.strip_suffix(';')?.trim()
    } else {
        return None;
    };
    if expr.is_empty() || expr.contains(['(', ')', ',', ';']) {
        return None;
    }
    let target = if expr.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'_') {
        format!("{expr}->{member}")
    } else {
        format!("({expr})->{member}")
    };
    let call = match alloc_fn {
        Some(AllocFn::New) => format!("delete {target};"),
        Some(AllocFn::NewArray) => format!("delete[] {target};"),
        _ => format!("free({target});"),
    };
    let added = format!("{indent}{call}");
    // Three lines of context each side.
    let first = line.saturating_sub(3).max(1);
    let last = (line + 2).min(lines.len());
    let mut out = String::new();
    let name = file.trim_start_matches('/');
    out.push_str(&format!("--- a/{name}\n+++ b/{name}\n"));
    let old_len = last - first + 1;
    out.push_str(&format!(
        "@@ -{first},{old_len} +{first},{} @@\n",
        old_len + 1
    ));
    for (i, l) in lines.iter().enumerate().take(last).skip(first - 1) {
        if i + 1 == line {
            out.push_str(&format!("+{added}\n"));
        }
        out.push_str(&format!(" {l}\n"));
    }
    Some(out)
}
