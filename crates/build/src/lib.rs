//! Making patch bundles.
//!
//! Today: [`handmade`], a bundle from a replacement object the operator compiled by hand
//! (`suture bundle`). The source-diff builder (`suture build`) will live here too; both end in
//! the same signed [`suture_bundle::Bundle`].

pub mod handmade;

pub use handmade::{handmade_manifest, Handmade, Replace};
