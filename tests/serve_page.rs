//! The page in a real browser: headless Chromium loads it from a running server, tries a
//! sample image (what its sample button does), and the test reads the rendered result: ranked
//! labels in the DOM, spikes drawn in the raster canvases, and raster-coloured pixels in a
//! screenshot written to `runs/serve/screenshot.png`.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use spikeclip::serve::{self, EngineConfig, Limits};

/// The raster's spike colour in the page (`#e4572e`).
const SPIKE_RGB: [u8; 3] = [0xe4, 0x57, 0x2e];

fn chromium() -> Option<PathBuf> {
    ["chromium", "chromium-browser", "google-chrome"]
        .into_iter()
        .map(|name| {
            Command::new("which")
                .arg(name)
                .output()
                .ok()
                .filter(|o| o.status.success())
                .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()))
        })
        .find_map(|p| p)
}

/// Runs headless Chromium on `url` with a fresh profile and the given extra flags; returns
/// its stdout.
fn headless(browser: &Path, profile: &Path, url: &str, extra: &[String]) -> String {
    let out = Command::new(browser)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--hide-scrollbars",
            "--window-size=1280,1100",
            // Virtual time runs the page's script and waits for its requests, then stops.
            "--virtual-time-budget=60000",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(extra)
        .arg(url)
        .output()
        .expect("chromium runs");
    assert!(
        out.status.success(),
        "chromium failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The value of the first `name="..."` attribute in `html`.
fn attribute<'a>(html: &'a str, name: &str) -> Option<&'a str> {
    let start = html.find(&format!("{name}=\""))? + name.len() + 2;
    html[start..].split('"').next()
}

#[test]
fn the_page_classifies_a_sample_in_headless_chromium_and_draws_the_raster() {
    let Some(browser) = chromium() else {
        println!("skipped: no chromium on PATH (CI installs Debian's `chromium`)");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let state = serve::start(
        EngineConfig::new(common::tiny_checkpoint(dir.path())),
        Limits::default(),
    )
    .unwrap();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = runtime.spawn(serve::serve(listener, serve::router(state), async {
        let _ = stopped.await;
    }));
    let url = format!("http://{addr}/?sample=0");

    let dom = headless(
        &browser,
        &dir.path().join("profile-dom"),
        &url,
        &["--dump-dom".to_string()],
    );
    let answered = attribute(&dom, "data-answered").expect("the page shows an answer");
    let world = spikeclip::data::world::World::class_names();
    assert!(world.iter().any(|c| c == answered), "{answered}");
    assert_eq!(
        dom.matches("data-rank=").count(),
        10,
        "the top ten labels as bars"
    );
    // Beside it, the world's analytic teacher's ranking, its top label sample 0's class.
    let samples = serve::page::Samples::of_world().unwrap();
    let shown = samples.caption(0).unwrap().split(" (").next().unwrap();
    assert_eq!(
        attribute(&dom, "data-teacher-answered"),
        Some(shown),
        "the teacher's answer shown"
    );
    assert_eq!(dom.matches("data-teacher-rank=").count(), 5);
    let drawn: usize = attribute(&dom, "data-spikes-drawn")
        .expect("the raster was drawn")
        .parse()
        .unwrap();
    assert!(drawn > 0, "spikes drawn in the raster");
    let energy = dom
        .split("id=\"energy\"")
        .nth(1)
        .and_then(|e| e.split("</div>").next());
    assert!(
        energy.is_some_and(|e| e.contains("mJ vs ANN twin")),
        "energy shown: {energy:?}"
    );

    let shots = Path::new(env!("CARGO_MANIFEST_DIR")).join("runs/serve");
    std::fs::create_dir_all(&shots).unwrap();
    let shot = shots.join("screenshot.png");
    let _ = std::fs::remove_file(&shot);
    headless(
        &browser,
        &dir.path().join("profile-shot"),
        &url,
        &[format!("--screenshot={}", shot.display())],
    );
    let png = image::open(&shot).expect("a screenshot").to_rgb8();
    let spike_pixels = png.pixels().filter(|p| p.0 == SPIKE_RGB).count();
    assert!(
        spike_pixels > 20,
        "{spike_pixels} raster pixels in {}",
        shot.display()
    );
    println!(
        "screenshot: {} ({spike_pixels} spike pixels)",
        shot.display()
    );

    stop.send(()).unwrap();
    runtime.block_on(server).unwrap().unwrap();
}
