//! Call frame information of a module (`.eh_frame`, found through `.eh_frame_hdr`'s table when
//! there is one), for walking another process's stack: at an instruction, where the caller's
//! frame begins (the CFA) and where the return address and the caller's frame pointer are saved.
//! x86-64 only.

use std::path::Path;

use object::{Object, ObjectSection};

use crate::Symbolizer;

/// How to find the caller's frame at one instruction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameRule {
    /// The canonical frame address is this register's value (DWARF numbering: 7 `rsp`, 6
    /// `rbp`) plus `cfa_offset`.
    pub cfa_reg: u16,
    pub cfa_offset: i64,
    /// The return address is saved at CFA + `ra_offset`.
    pub ra_offset: i64,
    /// The caller's `rbp` is saved at CFA + this, when it is (else it is unchanged).
    pub rbp_offset: Option<i64>,
}

/// A module's unwind sections, read once.
pub(crate) struct Cfi {
    eh_frame: Vec<u8>,
    eh_frame_addr: u64,
    hdr: Vec<u8>,
    hdr_addr: u64,
    text_addr: u64,
    got_addr: u64,
}

type R<'a> = gimli::EndianSlice<'a, gimli::LittleEndian>;

impl Cfi {
    fn load(data: &[u8]) -> Option<Cfi> {
        let obj = object::File::parse(data).ok()?;
        let sec = |name: &str| {
            obj.section_by_name(name).and_then(|s| {
                let bytes = s.uncompressed_data().ok()?.into_owned();
                Some((bytes, s.address()))
            })
        };
        let (eh_frame, eh_frame_addr) = sec(".eh_frame")?;
        let (hdr, hdr_addr) = sec(".eh_frame_hdr").unwrap_or_default();
        let text_addr = obj.section_by_name(".text").map_or(0, |s| s.address());
        let got_addr = obj.section_by_name(".got").map_or(0, |s| s.address());
        Some(Cfi {
            eh_frame,
            eh_frame_addr,
            hdr,
            hdr_addr,
            text_addr,
            got_addr,
        })
    }

    fn rule(&self, vaddr: u64) -> Option<FrameRule> {
        use gimli::UnwindSection;
        let le = gimli::LittleEndian;
        let eh = gimli::EhFrame::new(&self.eh_frame, le);
        let bases = gimli::BaseAddresses::default()
            .set_eh_frame(self.eh_frame_addr)
            .set_eh_frame_hdr(self.hdr_addr)
            .set_text(self.text_addr)
            .set_got(self.got_addr);
        let mut ctx: Box<gimli::UnwindContext<usize>> = Box::new(gimli::UnwindContext::new());
        let table = (!self.hdr.is_empty())
            .then(|| gimli::EhFrameHdr::new(&self.hdr, le).parse(&bases, 8).ok())
            .flatten();
        let row = match table.as_ref().and_then(|t| t.table()) {
            Some(t) => t
                .unwind_info_for_address(
                    &eh,
                    &bases,
                    &mut ctx,
                    vaddr,
                    |s: &gimli::EhFrame<R>, b, o| s.cie_from_offset(b, o),
                )
                .ok()?,
            None => eh
                .unwind_info_for_address(&bases, &mut ctx, vaddr, |s: &gimli::EhFrame<R>, b, o| {
                    s.cie_from_offset(b, o)
                })
                .ok()?,
        };
        let (cfa_reg, cfa_offset) = match row.cfa() {
            gimli::CfaRule::RegisterAndOffset { register, offset } => (register.0, *offset),
            gimli::CfaRule::Expression(_) => return None,
        };
        let ra_offset = match row.register(gimli::X86_64::RA) {
            Some(gimli::RegisterRule::Offset(o)) => o,
            _ => return None,
        };
        let rbp_offset = match row.register(gimli::X86_64::RBP) {
            Some(gimli::RegisterRule::Offset(o)) => Some(o),
            _ => None,
        };
        Some(FrameRule {
            cfa_reg,
            cfa_offset,
            ra_offset,
            rbp_offset,
        })
    }
}

impl Symbolizer {
    /// The frame rule at `vaddr` (an address in the module's ELF address space; for a return
    /// address, pass it less one) of the module at `path`, from its `.eh_frame`: `None` when it
    /// has none for that address, or the rule is one this walk does not follow (an expression).
    pub fn frame_rule(&mut self, path: &str, build_id: &[u8], vaddr: u64) -> Option<FrameRule> {
        let key = (path.to_string(), build_id.to_vec());
        if !self.cfi.contains_key(&key) {
            let cfi = crate::read_elf(Path::new(path))
                .ok()
                .filter(|(data, _)| {
                    build_id.is_empty()
                        || object::File::parse(&**data)
                            .ok()
                            .and_then(|o| o.build_id().ok().flatten().map(|b| b == build_id))
                            .unwrap_or(true)
                })
                .and_then(|(data, _)| Cfi::load(&data));
            self.cfi.insert(key.clone(), cfi);
        }
        self.cfi.get(&key)?.as_ref()?.rule(vaddr)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A function of this test binary that stays a function of its own, whatever the profile
    /// (called through a pointer the optimizer cannot see through).
    #[inline(never)]
    fn leakhunt_cfi_probe(x: u64) -> u64 {
        std::hint::black_box(x).wrapping_mul(3)
    }

    #[test]
    fn this_test_binarys_own_frames_have_rules() {
        // A function's first instruction has its CFA at rsp + 8 and the return address at
        // CFA - 8.
        let probe: fn(u64) -> u64 = std::hint::black_box(leakhunt_cfi_probe);
        assert_eq!(probe(2), 6);
        let exe = std::env::current_exe().unwrap();
        let data = std::fs::read(&exe).unwrap();
        let obj = object::File::parse(&*data).unwrap();
        use object::ObjectSymbol;
        let sym = obj
            .symbols()
            .find(|s| s.name().is_ok_and(|n| n.contains("leakhunt_cfi_probe")) && s.size() > 0)
            .expect("the probe function's symbol");
        let mut s = Symbolizer::new();
        let r = s
            .frame_rule(exe.to_str().unwrap(), &[], sym.address())
            .expect("a frame rule at the probe's first instruction");
        assert_eq!((r.cfa_reg, r.cfa_offset, r.ra_offset), (7, 8, -8));
        assert!(s.frame_rule("/nonexistent", &[], 0x1000).is_none());
    }
}
