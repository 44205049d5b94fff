//! `spikeclip serve` on 127.0.0.1, port 0: the JSON API, bad input, the batching queue's bound,
//! a panicking handler and graceful shutdown, on a fresh tiny SpikeCLIP checkpoint.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use axum::routing::get;
use candle_core::{Device, Tensor};
use spikeclip::data::prompts::{DatasetPrompts, PromptSet};
use spikeclip::serve::client::{self, multipart};
use spikeclip::serve::{self, AppState, BatchConfig, EngineConfig, Limits};
use tokio::sync::oneshot;

/// A running server: its address, the trigger of its shutdown and its task.
struct Running {
    addr: SocketAddr,
    stop: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

fn config(dir: &std::path::Path, batch: BatchConfig) -> EngineConfig {
    EngineConfig {
        batch,
        ..EngineConfig::new(common::tiny_checkpoint(dir))
    }
}

async fn start(app: axum::Router) -> Running {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(serve::serve(listener, app, async {
        let _ = stopped.await;
    }));
    Running { addr, stop, task }
}

async fn start_default(state: AppState) -> Running {
    start(serve::router(state)).await
}

fn sample_png() -> Vec<u8> {
    let samples = serve::page::Samples::of_world().unwrap();
    samples.png(0).unwrap().to_vec()
}

async fn classify(addr: SocketAddr, fields: &[(&str, &str)]) -> client::Response {
    let (ct, body) = multipart(&sample_png(), fields);
    client::post(addr, "/v1/classify", &ct, &body)
        .await
        .unwrap()
}

fn window(ms: u64, max_batch: usize, queue_bound: usize) -> BatchConfig {
    BatchConfig {
        window: Duration::from_millis(ms),
        max_batch,
        queue_bound,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_classifies_embeds_and_describes_the_model() {
    let dir = tempfile::tempdir().unwrap();
    let state = serve::start(config(dir.path(), window(2, 8, 16)), Limits::default()).unwrap();
    let server = start_default(state).await;
    let addr = server.addr;

    let health = client::get(addr, "/v1/health").await.unwrap();
    assert_eq!(health.status, 200);
    assert_eq!(health.json().unwrap()["status"], "ok");

    let card = client::get(addr, "/v1/model")
        .await
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(card["preset"], "tiny");
    assert_eq!(card["image_path"], "spike-driven");
    assert_eq!(card["time_steps"], 4);
    assert_eq!(card["default_labels"].as_array().unwrap().len(), 24);
    let total = card["parameters"]["total"].as_u64().unwrap();
    let parts = card["parameters"]["image"].as_u64().unwrap()
        + card["parameters"]["text"].as_u64().unwrap();
    assert!(total > 0 && total == parts, "{card}");

    let answer = classify(
        addr,
        &[
            ("labels", "red circle, blue square,green triangle"),
            ("raster", "1"),
        ],
    )
    .await;
    assert_eq!(answer.status, 200, "{:?}", answer.json());
    let a = answer.json().unwrap();
    let ranked = a["ranked"].as_array().unwrap();
    let labels: Vec<&str> = ranked
        .iter()
        .map(|r| r["label"].as_str().unwrap())
        .collect();
    let mut sorted = labels.clone();
    sorted.sort();
    assert_eq!(sorted, ["blue square", "green triangle", "red circle"]);
    let probs: Vec<f64> = ranked
        .iter()
        .map(|r| r["probability"].as_f64().unwrap())
        .collect();
    assert!((probs.iter().sum::<f64>() - 1.0).abs() < 1e-4, "{probs:?}");
    assert!(probs.windows(2).all(|w| w[0] >= w[1]), "ranked: {probs:?}");
    assert_eq!(a["cached_labels"], false);

    let rates = a["firing_rates"].as_array().unwrap();
    assert!(!rates.is_empty());
    for r in rates {
        let fr = r["firing_rate"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&fr), "{r}");
        assert_eq!(r["per_step_rates"].as_array().unwrap().len(), 4);
    }
    let energy = &a["energy"];
    let (snn, ann) = (
        energy["snn_mj"].as_f64().unwrap(),
        energy["ann_mj"].as_f64().unwrap(),
    );
    assert!(snn > 0.0 && ann > snn, "{energy}");
    assert!((energy["reduction_rate"].as_f64().unwrap() - (1.0 - snn / ann)).abs() < 1e-9);
    let raster = a["raster"].as_array().unwrap();
    assert_eq!(raster.len(), rates.len(), "one raster per LIF layer");
    for (layer, rate) in raster.iter().zip(rates) {
        assert_eq!(layer["layer"], rate["layer"]);
        let trains = layer["spikes"].as_array().unwrap();
        assert!(!trains.is_empty() && trains.len() <= serve::engine::RASTER_NEURONS);
        assert!(trains.iter().all(|t| t.as_array().unwrap().len() == 4));
    }
    assert!(a["timing"]["total_ms"].as_f64().unwrap() > 0.0);
    assert_eq!(a["timing"]["batch_size"], 1);

    // The same label set again comes from the cache; the answer is the same.
    let again = classify(
        addr,
        &[("labels", "red circle, blue square,green triangle")],
    )
    .await;
    let again = again.json().unwrap();
    assert_eq!(again["cached_labels"], true);
    assert_eq!(again["ranked"], a["ranked"]);
    assert!(again["raster"].is_null(), "raster only when asked for");

    // A raw body with the labels in the query string, and the default label set.
    let raw = client::post(
        addr,
        "/v1/classify?labels=red%20circle,blue%20square",
        "image/png",
        &sample_png(),
    )
    .await
    .unwrap();
    assert_eq!(raw.json().unwrap()["ranked"].as_array().unwrap().len(), 2);
    let default = classify(addr, &[]).await.json().unwrap();
    assert_eq!(default["ranked"].as_array().unwrap().len(), 24);

    let texts = client::post(
        addr,
        "/v1/embed",
        "application/json",
        br#"{"texts": ["red circle", "a blue square"]}"#,
    )
    .await
    .unwrap()
    .json()
    .unwrap();
    assert_eq!(texts["kind"], "text");
    assert_eq!(texts["features"].as_array().unwrap().len(), 2);
    assert_eq!(texts["dim"], 512);
    let image = client::post(addr, "/v1/embed", "image/png", &sample_png())
        .await
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(image["kind"], "image");
    assert_eq!(image["features"][0].as_array().unwrap().len(), 512);

    let page = client::get(addr, "/").await.unwrap();
    assert!(String::from_utf8_lossy(&page.body).contains("/v1/classify"));
    let samples = client::get(addr, "/v1/samples")
        .await
        .unwrap()
        .json()
        .unwrap();
    let url = samples[0]["url"].as_str().unwrap();
    let png = client::get(addr, url).await.unwrap();
    assert_eq!(png.header("content-type"), Some("image/png"));
    assert_eq!(png.body, sample_png());

    server.stop.send(()).unwrap();
    server.task.await.unwrap().unwrap();
}

fn png(width: u32, height: u32) -> Vec<u8> {
    let mut out = Vec::new();
    image::RgbImage::from_pixel(width, height, image::Rgb([10, 200, 10]))
        .write_to(&mut std::io::Cursor::new(&mut out), image::ImageFormat::Png)
        .unwrap();
    out
}

/// Asserts a 4xx with an error message that contains `needle`.
#[track_caller]
fn refused(r: &client::Response, status: u16, needle: &str) {
    let body = String::from_utf8_lossy(&r.body);
    assert_eq!(r.status, status, "{body}");
    let msg = r
        .json()
        .map(|v| v["error"].as_str().unwrap_or_default().to_string());
    let msg = msg.unwrap_or_else(|_| body.to_string());
    assert!(msg.contains(needle), "{needle:?} not in {msg:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_a_4xx_with_a_message_and_a_panic_is_a_500_for_that_request_only() {
    let dir = tempfile::tempdir().unwrap();
    let limits = Limits {
        body_bytes: 64 << 10,
        pixels: 200 * 200,
    };
    let mut cfg = config(dir.path(), window(1, 8, 16));
    let shapes = DatasetPrompts {
        classes: vec![vec!["circle".into()], vec!["square".into()]],
        templates: vec!["a {}.".into()],
    };
    cfg.prompts = Some(PromptSet {
        datasets: [("shapes".to_string(), shapes)].into(),
    });
    let state = serve::start(cfg, limits).unwrap();
    let app = serve::guarded(
        serve::api(state.clone()).route(
            "/v1/boom",
            get(|| async {
                if std::hint::black_box(true) {
                    panic!("boom");
                }
                "unreachable"
            }),
        ),
        &limits,
    );
    let server = start(app).await;
    let addr = server.addr;
    let post = |ct: &'static str, body: Vec<u8>| async move {
        client::post(addr, "/v1/classify", ct, &body).await.unwrap()
    };

    refused(
        &post("image/png", b"GIF89a, or rather just text".to_vec()).await,
        400,
        "not an image",
    );
    let whole = png(64, 64);
    refused(
        &post("image/png", whole[..whole.len() / 2].to_vec()).await,
        400,
        "truncated",
    );
    refused(&post("image/png", Vec::new()).await, 400, "no image");
    refused(
        &post("image/png", png(300, 300)).await,
        413,
        "more than 40000 pixels",
    );
    refused(
        &post("image/png", vec![0x89; 100 << 10]).await,
        413,
        "length limit",
    );
    refused(
        &classify(addr, &[("labels", " , ,")]).await,
        400,
        "label list is empty",
    );
    refused(
        &classify(addr, &[("prompt_set", "cifar10")]).await,
        400,
        "unknown prompt set \"cifar10\"; known: shapes",
    );
    refused(
        &classify(addr, &[("colour", "red")]).await,
        400,
        "unknown form field",
    );
    let embed = client::post(addr, "/v1/embed", "application/json", br#"{"texts": ["red"#)
        .await
        .unwrap();
    refused(&embed, 400, "");
    let embed = client::post(addr, "/v1/embed", "application/json", br#"{"texts": []}"#)
        .await
        .unwrap();
    refused(&embed, 400, "non-empty");
    refused(
        &client::get(addr, "/v1/nothing").await.unwrap(),
        404,
        "no such route",
    );

    let set = classify(addr, &[("prompt_set", "shapes")]).await;
    assert_eq!(set.json().unwrap()["ranked"].as_array().unwrap().len(), 2);

    refused(
        &client::get(addr, "/v1/boom").await.unwrap(),
        500,
        "failed inside the server",
    );
    assert_eq!(
        classify(addr, &[]).await.status,
        200,
        "still serving after the panic"
    );
    server.stop.send(()).unwrap();
    server.task.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn beyond_the_queue_bound_the_server_answers_503_with_retry_after() {
    let dir = tempfile::tempdir().unwrap();
    // A long collection window keeps the first request admitted while the second arrives.
    let state = serve::start(config(dir.path(), window(600, 8, 1)), Limits::default()).unwrap();
    let server = start_default(state).await;
    let addr = server.addr;
    let first = tokio::spawn(async move { classify(addr, &[]).await });
    tokio::time::sleep(Duration::from_millis(150)).await;
    let second = classify(addr, &[]).await;
    refused(&second, 503, "busy");
    assert_eq!(second.header("retry-after"), Some("1"));
    assert_eq!(first.await.unwrap().status, 200);
    assert_eq!(
        client::get(addr, "/v1/health")
            .await
            .unwrap()
            .json()
            .unwrap()["in_flight"],
        0
    );
    server.stop.send(()).unwrap();
    server.task.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn below_the_bound_concurrent_requests_all_succeed_batched_together() {
    let dir = tempfile::tempdir().unwrap();
    let state = serve::start(config(dir.path(), window(400, 8, 8)), Limits::default()).unwrap();
    let server = start_default(state).await;
    let addr = server.addr;
    let clients: Vec<_> = (0..6)
        .map(|_| tokio::spawn(async move { classify(addr, &[("raster", "1")]).await }))
        .collect();
    let mut biggest = 0;
    let mut rates = Vec::new();
    for c in clients {
        let r = c.await.unwrap();
        assert_eq!(r.status, 200, "{:?}", r.json());
        let a = r.json().unwrap();
        biggest = biggest.max(a["timing"]["batch_size"].as_u64().unwrap());
        rates.push(a["firing_rates"].clone());
    }
    assert!(biggest > 1, "requests within the window share a batch");
    // The same image gives the same per-image rates whatever its batch.
    assert!(rates.windows(2).all(|w| w[0] == w[1]));
    server.stop.send(()).unwrap();
    server.task.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_lets_the_request_in_flight_finish_then_stops_listening() {
    let dir = tempfile::tempdir().unwrap();
    let state = serve::start(config(dir.path(), window(500, 8, 8)), Limits::default()).unwrap();
    let server = start_default(state).await;
    let addr = server.addr;
    let in_flight = tokio::spawn(async move { classify(addr, &[]).await });
    tokio::time::sleep(Duration::from_millis(150)).await;
    server.stop.send(()).unwrap();
    let answered = in_flight.await.unwrap();
    assert_eq!(answered.status, 200, "{:?}", answered.json());
    tokio::time::timeout(Duration::from_secs(10), server.task)
        .await
        .expect("the server stops once the request is answered")
        .unwrap()
        .unwrap();
    assert!(
        client::get(addr, "/v1/health").await.is_err(),
        "no longer listening"
    );
}

/// Each image's spikes tapped from a batch are exactly its spikes run alone, on the
/// spike-driven (bit-packed) and the dense (f32) path: the per-request firing rates and
/// rasters are the request's own.
#[test]
fn per_image_spikes_of_a_batch_equal_the_image_run_alone() {
    let dir = tempfile::tempdir().unwrap();
    let loaded = spikeclip::recipe::classifier::LoadedStudent::open(
        &common::tiny_checkpoint(dir.path()),
        &Device::Cpu,
    )
    .unwrap();
    let images = Tensor::randn(0f32, 1.0, (3, 3, 32, 32), &Device::Cpu).unwrap();
    for dense in [false, true] {
        let inference = loaded.for_inference(dense).unwrap();
        let student = inference.student();
        let ops = student.energy_ops().unwrap().remove(0);
        let (_, batch) = ops
            .monitors
            .record_samples(3, 16, || Ok(student.image_features(&images, false)?))
            .unwrap();
        for (i, tapped) in batch.iter().enumerate() {
            let one = images.narrow(0, i, 1).unwrap();
            let (_, alone) = ops
                .monitors
                .record_samples(1, 16, || Ok(student.image_features(&one, false)?))
                .unwrap();
            assert_eq!(tapped, &alone[0], "image {i}, dense {dense}");
            let (_, counts) = ops
                .monitors
                .record(|| Ok(student.image_features(&one, false)?))
                .unwrap();
            for (layer, spikes) in tapped {
                assert_eq!(spikes.counts, counts[layer], "{layer}");
            }
        }
        let fired: u64 = batch
            .iter()
            .flat_map(|b| b.values())
            .map(|s| s.counts.spikes)
            .sum();
        assert!(fired > 0, "the test needs spikes");
    }
}

/// The name of the class a sample shows, from its caption ("red circle (seen pair)").
/// `GET path`'s JSON body.
async fn get_json(addr: SocketAddr, path: &str) -> serde_json::Value {
    client::get(addr, path).await.unwrap().json().unwrap()
}

/// `POST path` with `body` of type `ct`: the answer's JSON body.
async fn post_json(addr: SocketAddr, path: &str, ct: &str, body: &[u8]) -> serde_json::Value {
    client::post(addr, path, ct, body)
        .await
        .unwrap()
        .json()
        .unwrap()
}

fn sample_class(samples: &serve::page::Samples, id: usize) -> String {
    let caption = samples.caption(id).unwrap();
    caption.split(" (").next().unwrap().to_string()
}

fn teacher_labels(answer: &serde_json::Value) -> Vec<String> {
    answer["teacher"]["ranked"]
        .as_array()
        .unwrap_or_else(|| panic!("a teacher ranking: {answer}"))
        .iter()
        .map(|r| r["label"].as_str().unwrap().to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_world_checkpoint_is_answered_beside_the_worlds_analytic_teacher() {
    let dir = tempfile::tempdir().unwrap();
    let state = serve::start(config(dir.path(), window(1, 8, 16)), Limits::default()).unwrap();
    let server = start_default(state).await;
    let addr = server.addr;
    let card = get_json(addr, "/v1/model").await;
    assert_eq!(card["teacher"], "the built-in world's analytic teacher");

    // The analytic teacher is a perfect CLIP of the world: every sample's own class first,
    // whatever the (untrained) student answers.
    let samples = serve::page::Samples::of_world().unwrap();
    for id in 0..samples.len() {
        let (ct, body) = multipart(samples.png(id).unwrap(), &[]);
        let a = post_json(addr, "/v1/classify", &ct, &body).await;
        let labels = teacher_labels(&a);
        assert_eq!(labels.len(), 24);
        assert_eq!(labels[0], sample_class(&samples, id), "sample {id}: {a}");
        let probs: Vec<f64> = a["teacher"]["ranked"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["probability"].as_f64().unwrap())
            .collect();
        assert!((probs.iter().sum::<f64>() - 1.0).abs() < 1e-4, "{probs:?}");
        assert!(probs.windows(2).all(|w| w[0] >= w[1]), "ranked: {probs:?}");
    }
    // Among labels the request names, too.
    let own = sample_class(&samples, 0);
    let names = spikeclip::data::world::World::class_names();
    let other = names.iter().find(|n| **n != own).unwrap();
    let (ct, body) = multipart(
        samples.png(0).unwrap(),
        &[("labels", &format!("{other}, {own}"))],
    );
    let a = post_json(addr, "/v1/classify", &ct, &body).await;
    assert_eq!(teacher_labels(&a), [own, other.clone()]);

    // An image the world never drew has no teacher ranking, and says why.
    let other = post_json(addr, "/v1/classify", "image/png", &png(40, 30)).await;
    assert!(other["teacher"]["ranked"].is_null(), "{other}");
    assert!(
        other["teacher"]["note"]
            .as_str()
            .unwrap()
            .contains("sample images"),
        "{other}"
    );
    assert_eq!(other["ranked"].as_array().unwrap().len(), 24);
    server.stop.send(()).unwrap();
    server.task.await.unwrap().unwrap();
}

/// `--teacher clip:DIR` ranks the labels as CLIP's own features do: the probabilities equal
/// those computed from `spikeclip embed` (checked against transformers) on the same image file
/// and the same prompt sentences.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_clip_teacher_the_answer_carries_clips_ranking_of_the_labels() {
    let dir = tempfile::tempdir().unwrap();
    let clip = common::clip_dir(dir.path());
    let spec = format!("clip:{}", clip.display());
    let config = EngineConfig {
        teacher: Some(spikeclip::teacher::ModelSpec::parse(&spec).unwrap()),
        ..config(dir.path(), window(1, 8, 16))
    };
    let state = serve::start(config, Limits::default()).unwrap();
    let server = start_default(state).await;
    let addr = server.addr;
    let card = get_json(addr, "/v1/model").await;
    assert_eq!(card["teacher"], format!("CLIP ({})", clip.display()));

    let classes = ["red circle", "blue square", "green triangle"];
    let image = common::clip_fixture_dir().join("rgb_48x40.png");
    let a = post_json(
        addr,
        "/v1/classify?labels=red%20circle,blue%20square,green%20triangle",
        "image/png",
        &std::fs::read(&image).unwrap(),
    )
    .await;
    let got: Vec<(String, f64)> = a["teacher"]["ranked"]
        .as_array()
        .unwrap_or_else(|| panic!("a teacher ranking: {a}"))
        .iter()
        .map(|r| {
            let label = r["label"].as_str().unwrap().to_string();
            (label, r["probability"].as_f64().unwrap())
        })
        .collect();

    // The same ranking from `spikeclip embed`'s features.
    let prompts = DatasetPrompts {
        classes: classes.iter().map(|c| vec![c.to_string()]).collect(),
        templates: spikeclip::data::world::PROMPT_TEMPLATES
            .iter()
            .map(|t| t.to_string())
            .collect(),
    };
    let feats = dir.path().join("feats.safetensors");
    let mut args = vec![
        "embed".to_string(),
        "--model".to_string(),
        spec.clone(),
        "--normalize".to_string(),
        "--image".to_string(),
        image.display().to_string(),
        "--out".to_string(),
        feats.display().to_string(),
    ];
    for c in 0..classes.len() {
        for s in prompts.class_sentences(c) {
            args.extend(["--text".to_string(), s]);
        }
    }
    let run = std::process::Command::new(env!("CARGO_BIN_EXE_spikeclip"))
        .args(&args)
        .output()
        .unwrap();
    common::assert_success(&run);
    let f = candle_core::safetensors::load(&feats, &Device::Cpu).unwrap();
    let text: Vec<Vec<f32>> = f["text_features"].to_vec2().unwrap();
    let img: Vec<f32> = f["image_features"].get(0).unwrap().to_vec1().unwrap();
    let per_class = text.len() / classes.len();
    let logits: Vec<f64> = text
        .chunks(per_class)
        .map(|rows| {
            let mean: Vec<f64> = (0..img.len())
                .map(|d| rows.iter().map(|r| f64::from(r[d])).sum::<f64>() / per_class as f64)
                .collect();
            let norm = mean.iter().map(|x| x * x).sum::<f64>().sqrt();
            100.0
                * mean
                    .iter()
                    .zip(&img)
                    .map(|(m, i)| m * f64::from(*i))
                    .sum::<f64>()
                / norm
        })
        .collect();
    let top = logits.iter().copied().fold(f64::MIN, f64::max);
    let exp: Vec<f64> = logits.iter().map(|l| (l - top).exp()).collect();
    let sum: f64 = exp.iter().sum();
    assert_eq!(got.len(), classes.len());
    for (label, p) in &got {
        let c = classes.iter().position(|c| c == label).unwrap();
        assert!(
            (p - exp[c] / sum).abs() < 1e-4,
            "{label}: {p} vs {}",
            exp[c] / sum
        );
    }
    assert!(got.windows(2).all(|w| w[0].1 >= w[1].1), "ranked: {got:?}");
    // The student's own answer is still there beside it.
    assert_eq!(a["ranked"].as_array().unwrap().len(), 3);
    server.stop.send(()).unwrap();
    server.task.await.unwrap().unwrap();
}
