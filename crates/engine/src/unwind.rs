//! Walking a stopped thread's call stack with the modules' `.eh_frame` unwind tables, to find
//! its return addresses precisely (a stale word in a live frame is not a return address).
//!
//! Where the tables cannot answer (code without unwind info such as patch code or JIT output,
//! a signal frame's expression-based CFA), the walk stops and the caller falls back to the
//! conservative scan of the rest of the stack, so a gap in unwind info can cost a retry, never
//! safety.

use gimli::{
    BaseAddresses, CfaRule, CieOrFde, EhFrame, EhFrameHdr, EhFrameOffset, EndianSlice,
    FrameDescriptionEntry, LittleEndian, Pointer, Register, RegisterRule, UnwindContext,
    UnwindSection, X86_64,
};
use suture_module::Module;

use crate::modules::LoadedModule;

type R<'a> = EndianSlice<'a, LittleEndian>;

/// A module's unwind tables, read from its file apart from its symbols (only a stack that
/// needs walking needs them: [`crate::modules::read_unwind`]).
pub struct Unwind {
    tables: UnwindTables,
    /// The file's bytes where the tables lie; zero elsewhere.
    data: Vec<u8>,
}

impl Unwind {
    /// The tables in `data` (as [`suture_module::read_tables`] read them with
    /// [`suture_module::Tables::UNWIND`]); `None` if the module has none.
    pub fn read(data: Vec<u8>) -> Result<Option<Unwind>, suture_module::ModuleError> {
        let module = Module::parse_layout(&data)?;
        let tables = tables(&module, &data);
        drop(module);
        Ok(tables.map(|tables| Unwind { tables, data }))
    }
}

/// Where a module's unwind tables are, in its file and at link time.
#[derive(Debug, Clone)]
struct UnwindTables {
    eh_frame_vaddr: u64,
    eh_frame: (usize, usize),
    search: Search,
}

/// How to find the FDE for an address.
#[derive(Debug, Clone)]
enum Search {
    /// The binary-search table of `.eh_frame_hdr`.
    Hdr { vaddr: u64, range: (usize, usize) },
    /// Our own sorted index `(start, end, FDE offset)`, for modules linked without a header
    /// (static executables).
    Index(Vec<(u64, u64, usize)>),
}

fn range_of(data: &[u8], part: &[u8]) -> (usize, usize) {
    let start = part.as_ptr() as usize - data.as_ptr() as usize;
    (start, start + part.len())
}

/// Finds the tables through `PT_GNU_EH_FRAME` (stripped modules keep it), or else indexes
/// the `.eh_frame` section once.
fn tables(module: &Module, data: &[u8]) -> Option<UnwindTables> {
    if let Some(h) = module.eh_frame_hdr() {
        let hdr = module.bytes_at(h.vaddr, h.size)?;
        let bases = BaseAddresses::default().set_eh_frame_hdr(h.vaddr);
        let parsed = EhFrameHdr::new(hdr, LittleEndian).parse(&bases, 8).ok()?;
        let eh_frame_vaddr = match parsed.eh_frame_ptr() {
            Pointer::Direct(a) => a,
            Pointer::Indirect(_) => return None,
        };
        let eh = module.bytes_from(eh_frame_vaddr)?;
        return Some(UnwindTables {
            eh_frame_vaddr,
            eh_frame: range_of(data, eh),
            search: Search::Hdr {
                vaddr: h.vaddr,
                range: range_of(data, hdr),
            },
        });
    }
    let (vaddr, size) = module.eh_frame()?;
    let eh = module.bytes_at(vaddr, size)?;
    let bases = BaseAddresses::default().set_eh_frame(vaddr);
    let section: EhFrame<R> = EhFrame::new(eh, LittleEndian);
    let mut index = Vec::new();
    let mut entries = section.entries(&bases);
    while let Ok(Some(entry)) = entries.next() {
        if let CieOrFde::Fde(partial) = entry {
            if let Ok(fde) = partial.parse(EhFrame::cie_from_offset) {
                let start = fde.initial_address();
                index.push((start, start.saturating_add(fde.len()), fde.offset()));
            }
        }
    }
    index.sort_unstable();
    Some(UnwindTables {
        eh_frame_vaddr: vaddr,
        eh_frame: range_of(data, eh),
        search: Search::Index(index),
    })
}

impl UnwindTables {
    fn fde<'a>(
        &self,
        data: &'a [u8],
        pc: u64,
    ) -> Option<(EhFrame<R<'a>>, BaseAddresses, FrameDescriptionEntry<R<'a>>)> {
        let eh = data.get(self.eh_frame.0..self.eh_frame.1)?;
        let eh_frame: EhFrame<R> = EhFrame::new(eh, LittleEndian);
        match &self.search {
            Search::Hdr { vaddr, range } => {
                let bases = BaseAddresses::default()
                    .set_eh_frame_hdr(*vaddr)
                    .set_eh_frame(self.eh_frame_vaddr);
                let hdr = data.get(range.0..range.1)?;
                let parsed = EhFrameHdr::new(hdr, LittleEndian).parse(&bases, 8).ok()?;
                let fde = parsed
                    .table()?
                    .fde_for_address(&eh_frame, &bases, pc, EhFrame::cie_from_offset)
                    .ok()?;
                Some((eh_frame, bases, fde))
            }
            Search::Index(index) => {
                let bases = BaseAddresses::default().set_eh_frame(self.eh_frame_vaddr);
                let i = index
                    .partition_point(|(start, _, _)| *start <= pc)
                    .checked_sub(1)?;
                let (start, end, offset) = index[i];
                if pc < start || pc >= end {
                    return None;
                }
                let fde = eh_frame
                    .fde_from_offset(&bases, EhFrameOffset(offset), EhFrame::cie_from_offset)
                    .ok()?;
                Some((eh_frame, bases, fde))
            }
        }
    }
}

/// The registers the walk tracks: the stack and frame pointers and the callee-saved ones that
/// a CFA may be based on.
#[derive(Debug, Clone, Copy)]
pub struct Frame {
    pub pc: u64,
    pub sp: u64,
    regs: [u64; 17],
}

impl Frame {
    pub fn new(r: &libc::user_regs_struct) -> Frame {
        let mut regs = [0u64; 17];
        // DWARF numbering for x86-64.
        for (i, v) in [
            r.rax, r.rdx, r.rcx, r.rbx, r.rsi, r.rdi, r.rbp, r.rsp, r.r8, r.r9, r.r10, r.r11,
            r.r12, r.r13, r.r14, r.r15, r.rip,
        ]
        .into_iter()
        .enumerate()
        {
            regs[i] = v;
        }
        Frame {
            pc: r.rip,
            sp: r.rsp,
            regs,
        }
    }
}

/// Outcome of one step of the walk.
pub enum Step {
    /// The caller's frame.
    Caller(Frame),
    /// The outermost frame: the stack is fully walked.
    Done,
    /// The tables cannot say; scan the stack from `frame.sp` conservatively.
    Unknown,
}

pub struct Walker {
    ctx: Box<UnwindContext<usize>>,
}

impl Default for Walker {
    fn default() -> Self {
        Walker {
            ctx: Box::new(UnwindContext::new()),
        }
    }
}

impl Walker {
    /// Unwinds one frame. `read` reads a word of the target's stack. `first` is true for the
    /// innermost frame (its pc is exact; callers' pcs are return addresses, looked up at pc-1).
    pub fn step(
        &mut self,
        modules: &[LoadedModule],
        frame: &Frame,
        first: bool,
        read: &mut dyn FnMut(u64) -> Option<u64>,
    ) -> Step {
        let pc = if first {
            frame.pc
        } else {
            frame.pc.wrapping_sub(1)
        };
        let Some(m) = modules.iter().find(|m| pc >= m.lo && pc < m.hi) else {
            return Step::Unknown;
        };
        // Tables not read (yet) or none: the caller scans the rest conservatively.
        let Some(u) = m.facts.unwind() else {
            return Step::Unknown;
        };
        let link_pc = pc.wrapping_sub(m.bias);
        let Some((eh_frame, bases, fde)) = u.tables.fde(&u.data, link_pc) else {
            return Step::Unknown;
        };
        let Ok(row) = fde.unwind_info_for_address(&eh_frame, &bases, &mut self.ctx, link_pc) else {
            return Step::Unknown;
        };
        let cfa = match row.cfa() {
            CfaRule::RegisterAndOffset { register, offset } => {
                let Some(base) = frame.regs.get(register.0 as usize) else {
                    return Step::Unknown;
                };
                base.wrapping_add(*offset as u64)
            }
            _ => return Step::Unknown,
        };
        let mut next = *frame;
        for reg in [
            X86_64::RBX,
            X86_64::RBP,
            X86_64::R12,
            X86_64::R13,
            X86_64::R14,
            X86_64::R15,
            X86_64::RA,
        ] {
            let value = match row.register(reg) {
                RegisterRule::Undefined if reg == X86_64::RA => return Step::Done,
                RegisterRule::Undefined | RegisterRule::SameValue => continue,
                RegisterRule::Offset(o) => match read(cfa.wrapping_add(o as u64)) {
                    Some(v) => v,
                    None => return Step::Unknown,
                },
                RegisterRule::ValOffset(o) => cfa.wrapping_add(o as u64),
                RegisterRule::Register(Register(r)) => match frame.regs.get(r as usize) {
                    Some(v) => *v,
                    None => return Step::Unknown,
                },
                _ => return Step::Unknown,
            };
            next.regs[reg.0 as usize] = value;
        }
        next.pc = next.regs[X86_64::RA.0 as usize];
        next.sp = cfa;
        next.regs[X86_64::RSP.0 as usize] = cfa;
        if next.pc == 0 {
            return Step::Done;
        }
        if next.sp <= frame.sp {
            return Step::Unknown; // not making progress up the stack
        }
        Step::Caller(next)
    }
}
