//! Writes the patch object: the included sections of every changed object file in one ELF
//! relocatable, with each reference outside them turned into an undefined symbol that the
//! bundle binds to an exact address in the deployed module (or, for library functions, to a
//! name looked up in the process).

use std::collections::HashMap;

use anyhow::{anyhow, bail, Result};
use object::read::elf::ElfSection64;
use object::write::{Object as WObject, Relocation, SectionId, Symbol, SymbolId, SymbolSection};
use object::{
    elf, Architecture, BinaryFormat, Endianness, Object, ObjectSection, ObjectSymbol,
    RelocationFlags, RelocationTarget, SectionKind, SymbolFlags, SymbolIndex, SymbolKind,
    SymbolScope,
};
use suture_bundle::{BindTarget, Binding};

use super::differ::{
    covering_symbol, is_anchor, section_flags, Changes, Def, Inclusion, Obj, UnitBinding,
};

/// One changed object file, ready to be emitted.
pub struct Unit<'a, 'd> {
    pub obj: &'a Obj<'d>,
    pub changes: &'a Changes,
    pub inclusion: &'a Inclusion,
    /// How its symbols bind to the deployed module.
    pub binding: &'a UnitBinding<'a, 'd>,
}

pub struct Emitted {
    pub object: Vec<u8>,
    pub bindings: Vec<Binding>,
    /// (unit, entity key) → the symbol that replaces it in the object.
    pub replacements: HashMap<(usize, String), String>,
    /// Writable data the deployed module lacks, copied into the patch: `name (file)`.
    pub carried_writable: Vec<String>,
}

struct Emitter {
    out: WObject<'static>,
    bindings: Vec<Binding>,
    /// Undefined symbols already created, by their name in the output.
    undefined: HashMap<String, SymbolId>,
    /// Data the module lacks, copied into the patch: (unit, symbol) → output symbol.
    carried: HashMap<(usize, SymbolIndex), SymbolId>,
    carried_writable: Vec<String>,
}

fn bind_target(def: Def) -> BindTarget {
    if def.ifunc {
        BindTarget::ModuleIfunc {
            address: def.address,
        }
    } else if def.tls {
        BindTarget::ModuleTls {
            offset: def.address,
        }
    } else {
        BindTarget::Module {
            address: def.address,
        }
    }
}

impl Emitter {
    fn undefined(&mut self, name: &str, target: Option<BindTarget>) -> SymbolId {
        if let Some(id) = self.undefined.get(name) {
            return *id;
        }
        let id = self.out.add_symbol(Symbol {
            name: name.as_bytes().to_vec(),
            value: 0,
            size: 0,
            kind: SymbolKind::Unknown,
            scope: SymbolScope::Linkage,
            weak: false,
            section: SymbolSection::Undefined,
            flags: SymbolFlags::None,
        });
        if let Some(t) = target {
            self.bindings.push(Binding {
                symbol: name.to_string(),
                target: t,
            });
        }
        self.undefined.insert(name.to_string(), id);
        id
    }

    /// An output symbol for a definition of the deployed module (by exact address).
    fn module_symbol(&mut self, name: &str, label: &str, def: Def) -> SymbolId {
        let out_name = format!("{name}@{label}@{:x}", def.address);
        self.undefined(&out_name, Some(bind_target(def)))
    }
}

/// What a relocation of one unit can point at.
struct Refs<'a, 'd> {
    obj: &'a Obj<'d>,
    unit: usize,
    binding: &'a UnitBinding<'a, 'd>,
    /// Carried sections and symbols of this unit, by their index in its object.
    sec_map: &'a HashMap<object::SectionIndex, SectionId>,
    sym_map: &'a HashMap<SymbolIndex, SymbolId>,
    /// Global symbols carried by any unit.
    globals: &'a HashMap<String, SymbolId>,
}

impl Emitter {
    /// The output symbol and addend a relocation against input symbol `ti` becomes.
    fn target(
        &mut self,
        refs: &Refs,
        r_type: u32,
        ti: SymbolIndex,
        addend: i64,
    ) -> Result<(SymbolId, i64)> {
        let obj = refs.obj;
        let sym = obj.file.symbol_by_index(ti)?;
        let mut addend = addend;
        let target = if let Some(id) = refs.sym_map.get(&ti) {
            *id
        } else if is_anchor(&sym) {
            let tsi = sym
                .section_index()
                .ok_or_else(|| anyhow!("section symbol without section"))?;
            // A label is its section plus its offset.
            addend += sym.address() as i64;
            if let Some(&out) = refs.sec_map.get(&tsi) {
                self.out.section_symbol(out)
            } else {
                // Into an unchanged function or object: refer to it by its symbol.
                let at = addend
                    + if matches!(r_type, elf::R_X86_64_PC32 | elf::R_X86_64_PLT32) {
                        4
                    } else {
                        0
                    };
                let Some(c) = covering_symbol(&obj.file, tsi, at) else {
                    bail!(
                        "a reference into section {} where no symbol lies",
                        obj.file.section_by_index(tsi)?.name().unwrap_or("?")
                    )
                };
                addend -= c.address() as i64;
                let name = c.name().unwrap_or("");
                let def = refs.binding.by_symbol(c.index())?.ok_or_else(|| {
                    anyhow!(
                        "`{name}` (from {}) is not in the deployed module",
                        refs.binding.label
                    )
                })?;
                self.module_symbol(name, &refs.binding.label, def)
            }
        } else if sym.is_undefined() {
            let name = sym.name().unwrap_or("");
            if let Some(id) = refs.globals.get(name) {
                *id // carried by the patch itself (another changed file)
            } else if name == "_GLOBAL_OFFSET_TABLE_" {
                self.undefined(name, None)
            } else {
                // Defined elsewhere in the module (another file), else in a library.
                match refs.binding.undefined(name)? {
                    Some(def) => {
                        let out_name = format!("{name}@module@{:x}", def.address);
                        self.undefined(&out_name, Some(bind_target(def)))
                    }
                    None => self.undefined(
                        name,
                        Some(BindTarget::External {
                            name: name.to_string(),
                        }),
                    ),
                }
            }
        } else {
            // Defined in this object but not carried: the running module's copy, or, when the
            // module has none (a comdat the deployed link never needed, such as the `DW.ref`
            // of a newly caught exception type), a fresh copy in the patch: nothing in the
            // process can hold state in an object it does not have.
            let name = sym.name().unwrap_or("");
            match refs.binding.by_symbol(ti)? {
                Some(def) => self.module_symbol(name, &refs.binding.label, def),
                None => self.carry(refs, ti)?,
            }
        };
        Ok((target, addend))
    }

    /// Copies the section defining data symbol `ti` into the patch (once) and returns the
    /// symbol; the section's own references are resolved like any other.
    fn carry(&mut self, refs: &Refs, ti: SymbolIndex) -> Result<SymbolId> {
        let key = (refs.unit, ti);
        if let Some(id) = self.carried.get(&key) {
            return Ok(*id);
        }
        let obj = refs.obj;
        let sym = obj.file.symbol_by_index(ti)?;
        let name = sym.name().unwrap_or("");
        let sec = match sym.section_index() {
            Some(i) if sym.kind() == SymbolKind::Data => obj.file.section_by_index(i)?,
            _ => bail!(
                "`{name}` (from {}) is not in the deployed module",
                refs.binding.label
            ),
        };
        let writable = section_flags(&sec) & u64::from(elf::SHF_WRITE) != 0;
        let relro =
            sec.name().unwrap_or("").starts_with(".data.rel.ro") || name.starts_with("DW.ref.");
        if writable && !relro {
            self.carried_writable
                .push(format!("{name} ({})", refs.binding.label));
        }
        let kind = match (writable, sec.kind()) {
            (true, SectionKind::UninitializedData) => SectionKind::UninitializedData,
            (true, _) => SectionKind::Data,
            _ => SectionKind::ReadOnlyData,
        };
        let out_sec = self.out.add_section(
            Vec::new(),
            sec.name().unwrap_or(".data").as_bytes().to_vec(),
            kind,
        );
        if kind == SectionKind::UninitializedData {
            self.out
                .append_section_bss(out_sec, sec.size(), sec.align().max(1));
        } else {
            let data = sec.uncompressed_data()?.into_owned();
            self.out
                .section_mut(out_sec)
                .set_data(data, sec.align().max(1));
        }
        let id = self.out.add_symbol(Symbol {
            name: format!("{name}@{}@carried", refs.binding.label).into_bytes(),
            value: sym.address(),
            size: sym.size(),
            kind: SymbolKind::Data,
            scope: SymbolScope::Compilation,
            weak: false,
            section: SymbolSection::Section(out_sec),
            flags: SymbolFlags::None,
        });
        self.carried.insert(key, id);
        self.copy_relocations(refs, &sec, out_sec)?;
        Ok(id)
    }

    /// Gives output section `out_sec` the relocations of input section `sec`, each pointed at
    /// what its target becomes in the patch.
    fn copy_relocations(
        &mut self,
        refs: &Refs,
        sec: &ElfSection64<'_, '_>,
        out_sec: SectionId,
    ) -> Result<()> {
        for (offset, r) in sec.relocations() {
            let (RelocationFlags::Elf { r_type }, RelocationTarget::Symbol(t)) =
                (r.flags(), r.target())
            else {
                bail!(
                    "a relocation without a symbol, or not in ELF form, in {}",
                    sec.name().unwrap_or("?")
                );
            };
            let (symbol, addend) = self.target(refs, r_type, t, r.addend())?;
            self.out.add_relocation(
                out_sec,
                Relocation {
                    offset,
                    symbol,
                    addend,
                    flags: RelocationFlags::Elf { r_type },
                },
            )?;
        }
        Ok(())
    }
}

pub fn emit(units: &[Unit]) -> Result<Emitted> {
    let mut e = Emitter {
        out: WObject::new(BinaryFormat::Elf, Architecture::X86_64, Endianness::Little),
        bindings: Vec::new(),
        undefined: HashMap::new(),
        carried: HashMap::new(),
        carried_writable: Vec::new(),
    };
    let mut replacements = HashMap::new();
    // Pass 1: sections and the symbols defined in them, for every unit (a file's new global
    // function may be called from another changed file).
    let mut per_unit = Vec::new();
    let mut globals: HashMap<String, SymbolId> = HashMap::new();
    for (ui, unit) in units.iter().enumerate() {
        let obj = unit.obj;
        let src = unit.binding.label.clone();
        // Sections.
        let mut sec_map: HashMap<object::SectionIndex, SectionId> = HashMap::new();
        for &idx in &unit.inclusion.sections {
            let sec = obj.file.section_by_index(idx)?;
            let flags = section_flags(&sec);
            let name = sec.name().unwrap_or(".text").to_string();
            let kind = if flags & u64::from(elf::SHF_EXECINSTR) != 0 {
                SectionKind::Text
            } else if flags & u64::from(elf::SHF_WRITE) != 0 {
                if sec.kind() == SectionKind::UninitializedData {
                    SectionKind::UninitializedData
                } else {
                    SectionKind::Data
                }
            } else if flags & u64::from(elf::SHF_STRINGS) != 0 {
                SectionKind::ReadOnlyString
            } else {
                SectionKind::ReadOnlyData
            };
            let id = e.out.add_section(Vec::new(), name.into_bytes(), kind);
            if kind == SectionKind::UninitializedData {
                e.out.append_section_bss(id, sec.size(), sec.align().max(1));
            } else {
                let data = sec.uncompressed_data()?.into_owned();
                e.out.section_mut(id).set_data(data, sec.align().max(1));
            }
            sec_map.insert(idx, id);
        }
        // Symbols defined in those sections.
        let mut sym_map: HashMap<SymbolIndex, SymbolId> = HashMap::new();
        for s in obj.file.symbols() {
            let Some(si) = s.section_index() else {
                continue;
            };
            let Some(&out_sec) = sec_map.get(&si) else {
                continue;
            };
            if !matches!(s.kind(), SymbolKind::Text | SymbolKind::Data) {
                continue;
            }
            let name = s.name().unwrap_or("");
            if name.is_empty() {
                continue;
            }
            // Locals get the file in their name: two files may each have a static `f`.
            let out_name = if s.is_local() {
                format!("{name}@{src}")
            } else {
                name.to_string()
            };
            let id = e.out.add_symbol(Symbol {
                name: out_name.clone().into_bytes(),
                value: s.address(),
                size: s.size(),
                kind: s.kind(),
                scope: if s.is_local() {
                    SymbolScope::Compilation
                } else {
                    SymbolScope::Linkage
                },
                weak: false,
                section: SymbolSection::Section(out_sec),
                flags: SymbolFlags::None,
            });
            sym_map.insert(s.index(), id);
            if !s.is_local() {
                globals.insert(name.to_string(), id);
            }
            if let (SymbolKind::Text, Some(key)) = (s.kind(), obj.keys.get(&s.index())) {
                replacements.entry((ui, key.clone())).or_insert(out_name);
            }
        }
        per_unit.push((sec_map, sym_map));
    }
    // Pass 2: relocations, and the unwind records of the carried code.
    let mut eh_frame: Option<SectionId> = None;
    for (ui, (unit, (sec_map, sym_map))) in units.iter().zip(&per_unit).enumerate() {
        let obj = unit.obj;
        let refs = Refs {
            obj,
            unit: ui,
            binding: unit.binding,
            sec_map,
            sym_map,
            globals: &globals,
        };
        for &idx in &unit.inclusion.sections {
            let sec = obj.file.section_by_index(idx)?;
            e.copy_relocations(&refs, &sec, sec_map[&idx])?;
        }
        let Some((_, records)) = super::eh_frame::read(&obj.file)? else {
            continue;
        };
        let (bytes, relocs) = super::eh_frame::filter(&records, |s| sec_map.contains_key(&s));
        if bytes.is_empty() {
            continue;
        }
        let out_sec = *eh_frame.get_or_insert_with(|| {
            e.out
                .add_section(Vec::new(), b".eh_frame".to_vec(), SectionKind::ReadOnlyData)
        });
        let base = e.out.append_section_data(out_sec, &bytes, 8);
        for r in relocs {
            let (symbol, addend) = e.target(&refs, r.r_type, r.symbol, r.addend)?;
            e.out.add_relocation(
                out_sec,
                Relocation {
                    offset: base + r.offset,
                    symbol,
                    addend,
                    flags: RelocationFlags::Elf { r_type: r.r_type },
                },
            )?;
        }
    }
    let object = e.out.write()?;
    Ok(Emitted {
        object,
        bindings: e.bindings,
        replacements,
        carried_writable: e.carried_writable,
    })
}
