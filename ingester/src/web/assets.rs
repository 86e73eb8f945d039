//! The dashboard's static files, embedded in the binary (`include_bytes!`): served under a name
//! that carries a hash of their content, so browsers may cache them for a year and a new
//! binary's files are new URLs. Each is gzipped once, on first use.

use std::sync::OnceLock;

/// One embedded file.
pub struct Asset {
    /// The name pages link to, e.g. `app.css`.
    pub name: &'static str,
    pub content_type: &'static str,
    pub bytes: &'static [u8],
}

/// Every file the pages use. uPlot 1.6.32 comes from the npm package `uplot` (MIT, its licence
/// beside it in `static/vendor/uplot/`, see docs/web.md for where and how it was fetched).
pub const ASSETS: &[Asset] = &[
    Asset {
        name: "app.css",
        content_type: "text/css; charset=utf-8",
        bytes: include_bytes!("static/app.css"),
    },
    Asset {
        name: "app.js",
        content_type: "text/javascript; charset=utf-8",
        bytes: include_bytes!("static/app.js"),
    },
    Asset {
        name: "favicon.svg",
        content_type: "image/svg+xml",
        bytes: include_bytes!("static/favicon.svg"),
    },
    Asset {
        name: "uPlot.min.css",
        content_type: "text/css; charset=utf-8",
        bytes: include_bytes!("static/vendor/uplot/uPlot.min.css"),
    },
    Asset {
        name: "uPlot.iife.min.js",
        content_type: "text/javascript; charset=utf-8",
        bytes: include_bytes!("static/vendor/uplot/uPlot.iife.min.js"),
    },
    Asset {
        name: "uPlot-LICENSE.txt",
        content_type: "text/plain; charset=utf-8",
        bytes: include_bytes!("static/vendor/uplot/LICENSE"),
    },
];

/// An asset with its hashed name and gzipped bytes.
pub struct Served {
    pub asset: &'static Asset,
    /// `app.3f2a9c01d4e5b6a7.css`: the first 16 hex digits of the content's SHA-256.
    pub hashed: String,
    pub gzipped: Vec<u8>,
}

fn table() -> &'static [Served] {
    static TABLE: OnceLock<Vec<Served>> = OnceLock::new();
    TABLE.get_or_init(|| {
        ASSETS
            .iter()
            .map(|asset| {
                let digest = ring::digest::digest(&ring::digest::SHA256, asset.bytes);
                let hex: String = digest.as_ref()[..8]
                    .iter()
                    .map(|b| format!("{b:02x}"))
                    .collect();
                let hashed = match asset.name.rsplit_once('.') {
                    Some((stem, ext)) => format!("{stem}.{hex}.{ext}"),
                    None => format!("{}.{hex}", asset.name),
                };
                Served {
                    asset,
                    hashed,
                    gzipped: super::gzip(asset.bytes, flate2::Compression::best()),
                }
            })
            .collect()
    })
}

/// The URL path of asset `name` (`/static/<hashed name>`).
///
/// # Panics
/// If `name` is not in [`ASSETS`]: the pages name only files listed there (a unit test
/// renders every page).
pub fn url(name: &str) -> String {
    match table().iter().find(|s| s.asset.name == name) {
        Some(s) => format!("/static/{}", s.hashed),
        None => panic!("no embedded asset {name}"),
    }
}

/// The asset served at `/static/<hashed>`; an old or unknown hash is not found (a page of a
/// previous binary gets a 404, never another file's bytes under a cached name).
pub fn find(hashed: &str) -> Option<&'static Served> {
    table().iter().find(|s| s.hashed == hashed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_carry_the_content_hash() {
        let u = url("app.css");
        assert!(u.starts_with("/static/app.") && u.ends_with(".css"), "{u}");
        let hashed = u.trim_start_matches("/static/");
        assert_eq!(find(hashed).map(|s| s.asset.name), Some("app.css"));
        assert!(find("app.css").is_none());
        assert!(find("app.0000000000000000.css").is_none());
    }

    #[test]
    fn uplot_is_embedded_with_its_licence() {
        let js = find(url("uPlot.iife.min.js").trim_start_matches("/static/")).unwrap();
        assert!(js.asset.bytes.len() > 40_000);
        let licence = ASSETS
            .iter()
            .find(|a| a.name == "uPlot-LICENSE.txt")
            .unwrap();
        assert!(std::str::from_utf8(licence.bytes)
            .unwrap()
            .contains("Leon Sorokin"));
    }
}
