//! Verify phase, data layout: a struct, union or class whose layout the fix changes cannot be
//! patched live when data that already exists in the process has that type: a global or
//! static variable of it (or containing it), or anything reached through a pointer to it
//! (heap objects, shared state). Old instances keep the old layout, and new code would read
//! them wrongly.
//!
//! The diffing builds are compiled with `-g`; this module reads each object's DWARF
//! (`.debug_info`, relocated as the linker would, since an `ET_REL` object's string and abbrev
//! offsets are relocations) and compares the layouts of the named aggregates existing data
//! can hold. A struct only ever used by value on the stack may change: the functions using
//! it are replaced, and the safety check keeps threads out of them while patching.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};

use anyhow::{Context, Result};
use gimli::{AttributeValue, DwTag, EndianSlice, LittleEndian, UnitOffset};
use object::read::elf::ElfFile64;
use object::{Object, ObjectSection, ObjectSymbol, RelocationTarget};

use super::refusal::{refuse, RefusalKind};

/// The layout of one aggregate type, as the compiler laid it out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    pub size: Option<u64>,
    pub members: Vec<Member>,
}

/// One data member (or base class) of an aggregate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    pub name: String,
    pub bit_offset: u64,
    pub bit_size: Option<u64>,
    /// A shallow description of the member's type (`int`, `struct peer *`, `char[16]`).
    pub ty: String,
    pub size: Option<u64>,
}

/// The aggregates of one object file.
#[derive(Debug, Default)]
pub struct Aggregates {
    /// Every defined, named aggregate (`struct conn`, `class ns::Session`, a typedef'd
    /// anonymous struct by its typedef name).
    pub all: BTreeMap<String, Layout>,
    /// The aggregates existing data can hold, with the first reason found.
    pub used_by: BTreeMap<String, String>,
}

/// Reads the aggregates of an object; `None` if it carries no DWARF.
pub fn aggregates(file: &ElfFile64<'_>) -> Result<Option<Aggregates>> {
    if file.section_by_name(".debug_info").is_none() {
        return Ok(None);
    }
    let sections = gimli::DwarfSections::load(|id| -> Result<Cow<'_, [u8]>> {
        relocated_section(file, id.name())
    })?;
    let dwarf = sections.borrow(|s| EndianSlice::new(s, LittleEndian));
    let mut out = Aggregates::default();
    let mut units = dwarf.units();
    while let Some(header) = units.next().context("reading DWARF units")? {
        let unit = dwarf.unit(header).context("reading a DWARF unit")?;
        let mut types = UnitTypes::default();
        let mut tree = unit.entries_tree(None)?;
        types.walk(&dwarf, &unit, tree.root()?, "", false)?;
        types.collect(&mut out);
    }
    Ok(Some(out))
}

/// Every source file the object's line tables name (the compiled file and the headers and
/// included files that contributed code or declarations), as recorded: absolute, or joined
/// to the compile directory.
pub fn source_files(file: &ElfFile64<'_>) -> Result<Vec<std::path::PathBuf>> {
    use std::path::PathBuf;
    if file.section_by_name(".debug_line").is_none() {
        return Ok(Vec::new());
    }
    let sections = gimli::DwarfSections::load(|id| -> Result<Cow<'_, [u8]>> {
        relocated_section(file, id.name())
    })?;
    let dwarf = sections.borrow(|s| EndianSlice::new(s, LittleEndian));
    let mut out = Vec::new();
    let mut units = dwarf.units();
    while let Some(header) = units.next().context("reading DWARF units")? {
        let unit = dwarf.unit(header).context("reading a DWARF unit")?;
        let comp_dir = unit
            .comp_dir
            .map(|d| PathBuf::from(d.to_string_lossy().into_owned()))
            .unwrap_or_default();
        let Some(program) = unit.line_program.clone() else {
            continue;
        };
        let header = program.header();
        let text = |v: AttributeValue<Reader<'_>>| -> Option<String> {
            dwarf
                .attr_string(&unit, v)
                .ok()
                .map(|s| s.to_string_lossy().into_owned())
        };
        for fe in header.file_names() {
            let Some(name) = text(fe.path_name()) else {
                continue;
            };
            let dir = fe
                .directory(header)
                .and_then(text)
                .map(PathBuf::from)
                .unwrap_or_default();
            out.push(comp_dir.join(dir).join(name));
        }
    }
    Ok(out)
}

/// Refuses when an aggregate existing data uses has a different layout in the patched object.
pub fn check(orig: &ElfFile64<'_>, patched: &ElfFile64<'_>) -> Result<()> {
    let (Some(o), Some(p)) = (aggregates(orig)?, aggregates(patched)?) else {
        tracing::warn!("no debug info in the diffing build; struct layout changes are not checked");
        return Ok(());
    };
    for (name, why) in &o.used_by {
        let (Some(a), Some(b)) = (o.all.get(name), p.all.get(name)) else {
            continue;
        };
        if a != b {
            return Err(refuse(
                RefusalKind::Layout,
                format!(
                    "the layout of `{name}` changed ({}) and existing data has that type ({why})",
                    explain(a, b)
                ),
            ));
        }
    }
    Ok(())
}

/// The first differences between two layouts, in words.
fn explain(a: &Layout, b: &Layout) -> String {
    let mut said = Vec::new();
    if a.size != b.size {
        said.push(format!(
            "size {} → {} bytes",
            a.size.map_or("?".into(), |s| s.to_string()),
            b.size.map_or("?".into(), |s| s.to_string())
        ));
    }
    for m in &a.members {
        match b.members.iter().find(|n| n.name == m.name) {
            None => said.push(format!("member `{}` removed", m.name)),
            Some(n) if n.bit_offset != m.bit_offset => said.push(format!(
                "member `{}` moved from offset {} to {}",
                m.name,
                offset(m.bit_offset),
                offset(n.bit_offset)
            )),
            Some(n) if n.ty != m.ty || n.size != m.size || n.bit_size != m.bit_size => said.push(
                format!("member `{}` changed from `{}` to `{}`", m.name, m.ty, n.ty),
            ),
            Some(_) => {}
        }
    }
    for n in &b.members {
        if !a.members.iter().any(|m| m.name == n.name) {
            said.push(format!("member `{}` added", n.name));
        }
    }
    said.truncate(3);
    if said.is_empty() {
        "members reordered".into()
    } else {
        said.join(", ")
    }
}

fn offset(bits: u64) -> String {
    if bits.is_multiple_of(8) {
        (bits / 8).to_string()
    } else {
        format!("{}.{} (bits)", bits / 8, bits % 8)
    }
}

/// A debug section with its relocations applied (section symbols resolve to 0 in an object,
/// so a relocation's value is the symbol value plus the addend).
fn relocated_section<'d>(file: &ElfFile64<'d>, name: &str) -> Result<Cow<'d, [u8]>> {
    let Some(sec) = file.section_by_name(name) else {
        return Ok(Cow::Borrowed(&[]));
    };
    let data = sec.data().with_context(|| format!("reading {name}"))?;
    if sec.relocations().next().is_none() {
        return Ok(Cow::Borrowed(data));
    }
    let mut out = data.to_vec();
    for (at, r) in sec.relocations() {
        let base = match r.target() {
            RelocationTarget::Symbol(i) => {
                file.symbol_by_index(i).map(|s| s.address()).unwrap_or(0)
            }
            _ => 0,
        };
        let value = base.wrapping_add(r.addend() as u64);
        let width = usize::from(r.size() / 8);
        let start = usize::try_from(at).unwrap_or(usize::MAX);
        if let Some(dst) = start
            .checked_add(width)
            .and_then(|end| out.get_mut(start..end))
        {
            dst.copy_from_slice(&value.to_le_bytes()[..width.min(8)]);
        }
    }
    Ok(Cow::Owned(out))
}

type Reader<'a> = EndianSlice<'a, LittleEndian>;

/// One type entry of a unit, with what the layout comparison needs.
#[derive(Debug)]
struct TypeEntry {
    tag: DwTag,
    name: Option<String>,
    scope: String,
    size: Option<u64>,
    ty: Option<UnitOffset>,
    declaration: bool,
    members: Vec<RawMember>,
    /// Array dimensions.
    dims: Vec<Option<u64>>,
}

#[derive(Debug)]
struct RawMember {
    name: String,
    bit_offset: u64,
    bit_size: Option<u64>,
    ty: Option<UnitOffset>,
}

#[derive(Default)]
struct UnitTypes {
    types: HashMap<UnitOffset, TypeEntry>,
    /// The first typedef naming each type (names anonymous aggregates).
    typedef_of: HashMap<UnitOffset, String>,
    /// Types that existing data holds, with why.
    roots: Vec<(UnitOffset, String)>,
}

fn is_aggregate(tag: DwTag) -> bool {
    matches!(
        tag,
        gimli::DW_TAG_structure_type | gimli::DW_TAG_union_type | gimli::DW_TAG_class_type
    )
}

fn udata(v: Option<AttributeValue<Reader<'_>>>) -> Option<u64> {
    v.and_then(|v| v.udata_value())
}

impl UnitTypes {
    fn walk(
        &mut self,
        dwarf: &gimli::Dwarf<Reader<'_>>,
        unit: &gimli::Unit<Reader<'_>>,
        node: gimli::EntriesTreeNode<'_, '_, '_, Reader<'_>>,
        scope: &str,
        in_function: bool,
    ) -> Result<()> {
        let e = node.entry();
        let tag = e.tag();
        let offset = e.offset();
        let name = match e.attr_value(gimli::DW_AT_name)? {
            Some(v) => Some(dwarf.attr_string(unit, v)?.to_string_lossy().into_owned()),
            None => None,
        };
        let ty = match e.attr_value(gimli::DW_AT_type)? {
            Some(AttributeValue::UnitRef(o)) => Some(o),
            _ => None,
        };
        let declaration = matches!(
            e.attr_value(gimli::DW_AT_declaration)?,
            Some(AttributeValue::Flag(true))
        );
        match tag {
            gimli::DW_TAG_variable => {
                let vname = name.clone().unwrap_or_default();
                let static_storage = if in_function {
                    // A function's static variable lives at a fixed address (DW_OP_addr).
                    matches!(
                        e.attr_value(gimli::DW_AT_location)?,
                        Some(AttributeValue::Exprloc(x)) if x.0.slice().first() == Some(&0x03)
                    )
                } else {
                    true
                };
                if let (true, Some(t)) = (static_storage, ty) {
                    let kind = if in_function { "static" } else { "global" };
                    self.roots.push((t, format!("{kind} `{vname}`")));
                }
            }
            gimli::DW_TAG_pointer_type
            | gimli::DW_TAG_reference_type
            | gimli::DW_TAG_rvalue_reference_type => {
                if let Some(t) = ty {
                    self.roots
                        .push((t, "objects reached through pointers".to_string()));
                }
            }
            gimli::DW_TAG_typedef => {
                if let (Some(t), Some(n)) = (ty, &name) {
                    self.typedef_of
                        .entry(t)
                        .or_insert_with(|| format!("{scope}{n}"));
                }
            }
            _ => {}
        }
        let mut entry = TypeEntry {
            tag,
            name: name.clone(),
            scope: scope.to_string(),
            size: udata(e.attr_value(gimli::DW_AT_byte_size)?),
            ty,
            declaration,
            members: Vec::new(),
            dims: Vec::new(),
        };
        let child_scope = match (tag, &name) {
            (gimli::DW_TAG_namespace, Some(n)) => format!("{scope}{n}::"),
            (t, Some(n)) if is_aggregate(t) => format!("{scope}{n}::"),
            _ => scope.to_string(),
        };
        let in_function = in_function || tag == gimli::DW_TAG_subprogram;
        let mut children = node.children();
        while let Some(child) = children.next()? {
            let c = child.entry();
            match (tag, c.tag()) {
                (t, gimli::DW_TAG_member | gimli::DW_TAG_inheritance) if is_aggregate(t) => {
                    let static_member = matches!(
                        c.attr_value(gimli::DW_AT_declaration)?,
                        Some(AttributeValue::Flag(true))
                    );
                    if !static_member {
                        entry.members.push(member(dwarf, unit, c)?);
                    }
                }
                (gimli::DW_TAG_array_type, gimli::DW_TAG_subrange_type) => {
                    let count = udata(c.attr_value(gimli::DW_AT_count)?)
                        .or(udata(c.attr_value(gimli::DW_AT_upper_bound)?)
                            .map(|u| u.saturating_add(1)));
                    entry.dims.push(count);
                }
                _ => {}
            }
            self.walk(dwarf, unit, child, &child_scope, in_function)?;
        }
        self.types.insert(offset, entry);
        Ok(())
    }

    /// The display name of an aggregate, if it has one (directly or through a typedef).
    fn aggregate_name(&self, at: UnitOffset) -> Option<String> {
        let t = self.types.get(&at)?;
        let kind = match t.tag {
            gimli::DW_TAG_structure_type => "struct",
            gimli::DW_TAG_union_type => "union",
            _ => "class",
        };
        if let Some(n) = &t.name {
            return Some(format!("{kind} {}{n}", t.scope));
        }
        self.typedef_of.get(&at).cloned()
    }

    /// A shallow description of a type: names, not contents, except for anonymous aggregates.
    fn describe(&self, at: Option<UnitOffset>, depth: u32) -> String {
        let Some(at) = at else {
            return "void".into();
        };
        let Some(t) = self.types.get(&at) else {
            return "?".into();
        };
        if depth > 8 {
            return "…".into();
        }
        let inner = |d| self.describe(t.ty, d);
        match t.tag {
            gimli::DW_TAG_base_type | gimli::DW_TAG_typedef | gimli::DW_TAG_enumeration_type => {
                t.name.clone().unwrap_or_else(|| "enum".into())
            }
            gimli::DW_TAG_pointer_type => format!("{}*", inner(depth + 1)),
            gimli::DW_TAG_reference_type => format!("{}&", inner(depth + 1)),
            gimli::DW_TAG_rvalue_reference_type => format!("{}&&", inner(depth + 1)),
            gimli::DW_TAG_const_type => format!("const {}", inner(depth + 1)),
            gimli::DW_TAG_volatile_type => format!("volatile {}", inner(depth + 1)),
            gimli::DW_TAG_atomic_type => format!("_Atomic {}", inner(depth + 1)),
            gimli::DW_TAG_restrict_type => inner(depth + 1),
            gimli::DW_TAG_array_type => {
                let dims: String = t
                    .dims
                    .iter()
                    .map(|d| d.map_or("[]".into(), |n| format!("[{n}]")))
                    .collect();
                format!("{}{dims}", inner(depth + 1))
            }
            gimli::DW_TAG_subroutine_type => "fn".into(),
            tag if is_aggregate(tag) => match &t.name {
                Some(_) => self.aggregate_name(at).unwrap_or_default(),
                // Anonymous members are part of the enclosing layout.
                None => {
                    let l = self.layout(at, depth + 1);
                    let members: Vec<String> = l
                        .members
                        .iter()
                        .map(|m| format!("{}@{}:{}", m.name, m.bit_offset, m.ty))
                        .collect();
                    format!("{{{}}}", members.join(";"))
                }
            },
            _ => t.name.clone().unwrap_or_else(|| "?".into()),
        }
    }

    /// The size of a type in bytes, through typedefs, qualifiers and arrays.
    fn size_of(&self, at: Option<UnitOffset>, depth: u32) -> Option<u64> {
        let t = self.types.get(&at?)?;
        if let Some(s) = t.size {
            return Some(s);
        }
        if depth > 16 {
            return None;
        }
        match t.tag {
            gimli::DW_TAG_array_type => {
                let elem = self.size_of(t.ty, depth + 1)?;
                t.dims
                    .iter()
                    .try_fold(elem, |acc, d| acc.checked_mul((*d)?))
            }
            _ => self.size_of(t.ty, depth + 1),
        }
    }

    fn layout(&self, at: UnitOffset, depth: u32) -> Layout {
        let t = &self.types[&at];
        Layout {
            size: t.size,
            members: t
                .members
                .iter()
                .map(|m| Member {
                    name: m.name.clone(),
                    bit_offset: m.bit_offset,
                    bit_size: m.bit_size,
                    ty: self.describe(m.ty, depth + 1),
                    size: self.size_of(m.ty, 0),
                })
                .collect(),
        }
    }

    /// Marks what existing data reaches (by value) and records every named aggregate.
    fn collect(&self, out: &mut Aggregates) {
        for (&at, t) in &self.types {
            if is_aggregate(t.tag) && !t.declaration {
                if let Some(name) = self.aggregate_name(at) {
                    out.all.entry(name).or_insert_with(|| self.layout(at, 0));
                }
            }
        }
        let mut seen = std::collections::HashSet::new();
        let mut work: Vec<(UnitOffset, &str)> = self
            .roots
            .iter()
            .map(|(t, why)| (*t, why.as_str()))
            .collect();
        while let Some((at, why)) = work.pop() {
            if !seen.insert(at) {
                continue;
            }
            let Some(t) = self.types.get(&at) else {
                continue;
            };
            if is_aggregate(t.tag) {
                if let Some(name) = self.aggregate_name(at) {
                    out.used_by.entry(name).or_insert_with(|| why.to_string());
                }
                work.extend(t.members.iter().filter_map(|m| m.ty.map(|ty| (ty, why))));
            } else if t.tag != gimli::DW_TAG_pointer_type
                && t.tag != gimli::DW_TAG_reference_type
                && t.tag != gimli::DW_TAG_rvalue_reference_type
            {
                if let Some(ty) = t.ty {
                    work.push((ty, why));
                }
            }
        }
    }
}

fn member(
    dwarf: &gimli::Dwarf<Reader<'_>>,
    unit: &gimli::Unit<Reader<'_>>,
    e: &gimli::DebuggingInformationEntry<'_, '_, Reader<'_>>,
) -> Result<RawMember> {
    let name = match e.attr_value(gimli::DW_AT_name)? {
        Some(v) => dwarf.attr_string(unit, v)?.to_string_lossy().into_owned(),
        None if e.tag() == gimli::DW_TAG_inheritance => "<base>".into(),
        None => "<anonymous>".into(),
    };
    let byte_offset = udata(e.attr_value(gimli::DW_AT_data_member_location)?).unwrap_or(0);
    let bit_offset = match udata(e.attr_value(gimli::DW_AT_data_bit_offset)?) {
        Some(b) => b,
        None => byte_offset.saturating_mul(8),
    };
    let ty = match e.attr_value(gimli::DW_AT_type)? {
        Some(AttributeValue::UnitRef(o)) => Some(o),
        _ => None,
    };
    Ok(RawMember {
        name,
        bit_offset,
        bit_size: udata(e.attr_value(gimli::DW_AT_bit_size)?),
        ty,
    })
}
