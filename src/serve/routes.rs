//! The HTTP surface: the versioned JSON API, the page and its sample images.
//!
//! Every refusal is a JSON `{"error": ...}` with a 4xx status that says whose fault it was; a
//! full queue is 503 with `Retry-After`; a panic anywhere in a handler is a 500 for that request
//! only.

use std::sync::Arc;
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, FromRequest, Multipart, Path, Query, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use candle_core::Tensor;
use serde::Deserialize;
use serde_json::{json, Value};
use tower_http::catch_panic::CatchPanicLayer;

use super::card::ModelInfo;
use super::engine::{Answer, Engine, Job, Labels};
use super::image_input::{decode as decode_image, student_input_of, BadImage};
use super::page::{Samples, PAGE};
use super::queue::Refusal;
use super::teacher::{TeacherImage, TeacherView};

/// Size limits on what a request may carry.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Limits {
    /// Most bytes of a request body.
    pub body_bytes: usize,
    /// Most decoded pixels of an uploaded image.
    pub pixels: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            body_bytes: 8 << 20,
            pixels: super::image_input::DEFAULT_MAX_PIXELS,
        }
    }
}

/// What every handler shares.
#[derive(Clone)]
pub struct AppState {
    pub engine: Engine,
    pub info: Arc<ModelInfo>,
    /// How uploads become the teacher's input, when the server has a teacher.
    pub teacher: Option<TeacherView>,
    pub samples: Arc<Samples>,
    pub limits: Limits,
}

/// The service's routes with their guards.
pub fn router(state: AppState) -> Router {
    let limits = state.limits;
    guarded(api(state), &limits)
}

/// `routes` behind the guards: the body limit, and a panic catcher that turns a panic in a
/// handler into a 500 for that request alone.
pub fn guarded(routes: Router, limits: &Limits) -> Router {
    routes
        .layer(DefaultBodyLimit::max(limits.body_bytes))
        .layer(CatchPanicLayer::custom(|_| {
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "the request failed inside the server",
            )
            .into_response()
        }))
}

/// The routes alone, so a caller can add its own before [`guarded`] puts the guards on.
pub fn api(state: AppState) -> Router {
    Router::new()
        .route("/", get(|| async { Html(PAGE) }))
        .route("/v1/health", get(health))
        .route("/v1/model", get(model))
        .route("/v1/samples", get(samples))
        .route("/v1/samples/{id}", get(sample_png))
        .route("/v1/classify", post(classify))
        .route("/v1/embed", post(embed))
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "no such route") })
        .with_state(state)
}

/// A refusal with a status and a message for the client.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
        }
    }

    fn bad(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status, Json(json!({ "error": self.message }))).into_response();
        if self.status == StatusCode::SERVICE_UNAVAILABLE {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        response
    }
}

impl From<Refusal> for ApiError {
    fn from(r: Refusal) -> Self {
        let status = match r {
            Refusal::Full(_) => StatusCode::SERVICE_UNAVAILABLE,
            Refusal::Panicked(_) | Refusal::Stopped => StatusCode::INTERNAL_SERVER_ERROR,
        };
        Self::new(status, r.to_string())
    }
}

async fn health(State(state): State<AppState>) -> Json<Value> {
    Json(json!({
        "status": "ok",
        "in_flight": state.engine.in_flight(),
        "queue_bound": state.info.batching.queue_bound,
    }))
}

async fn model(State(state): State<AppState>) -> Json<ModelInfo> {
    Json(state.info.as_ref().clone())
}

async fn samples(State(state): State<AppState>) -> Json<Value> {
    let list: Vec<Value> = (0..state.samples.len())
        .map(|i| {
            json!({
                "id": i,
                "caption": state.samples.caption(i),
                "url": format!("/v1/samples/{i}"),
            })
        })
        .collect();
    Json(Value::Array(list))
}

async fn sample_png(
    State(state): State<AppState>,
    Path(id): Path<usize>,
) -> Result<Response, ApiError> {
    let png = state
        .samples
        .png(id)
        .ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, format!("no sample {id}")))?;
    Ok(([(header::CONTENT_TYPE, "image/png")], png.to_vec()).into_response())
}

/// Options of a classify request, in the query string or as multipart fields.
#[derive(Debug, Default, Deserialize)]
struct ClassifyOptions {
    /// Comma-separated label names.
    labels: Option<String>,
    prompt_set: Option<String>,
    /// Include the spike raster of the image's path.
    #[serde(default)]
    raster: bool,
}

/// An upload's image bytes and the options that came with it.
struct Upload {
    image: Bytes,
    options: ClassifyOptions,
}

/// Reads a multipart form (field `image`, optional `labels`, `prompt_set`, `raster`) or a raw
/// body with its options in the query string.
async fn upload(state: &AppState, request: Request) -> Result<Upload, ApiError> {
    let Query(mut options) = Query::<ClassifyOptions>::try_from_uri(request.uri())
        .map_err(|e| ApiError::bad(format!("bad query string: {}", e.body_text())))?;
    let is_form = request
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("multipart/form-data"));
    if !is_form {
        let image = Bytes::from_request(request, state)
            .await
            .map_err(|e| ApiError::new(e.status(), e.body_text()))?;
        return Ok(Upload { image, options });
    }
    let mut form = Multipart::from_request(request, state)
        .await
        .map_err(|e| ApiError::new(e.status(), e.body_text()))?;
    let mut image = Bytes::new();
    loop {
        let field = form
            .next_field()
            .await
            .map_err(|e| ApiError::new(e.status(), e.body_text()))?;
        let Some(field) = field else { break };
        let name = field.name().unwrap_or_default().to_string();
        let value = field
            .bytes()
            .await
            .map_err(|e| ApiError::new(e.status(), e.body_text()))?;
        let text = || String::from_utf8_lossy(&value).into_owned();
        match name.as_str() {
            "image" => image = value.clone(),
            "labels" => options.labels = Some(text()),
            "prompt_set" => options.prompt_set = Some(text()).filter(|s| !s.is_empty()),
            "raster" => options.raster = matches!(text().as_str(), "1" | "true" | "on"),
            other => return Err(ApiError::bad(format!("unknown form field {other:?}"))),
        }
    }
    Ok(Upload { image, options })
}

/// The label set a request names, checked against what the server has.
fn labels(state: &AppState, options: &ClassifyOptions) -> Result<Labels, ApiError> {
    match (&options.labels, &options.prompt_set) {
        (Some(_), Some(_)) => Err(ApiError::bad("give labels or a prompt set, not both")),
        (None, None) => Ok(Labels::Default),
        (None, Some(set)) => {
            if state.info.prompt_sets.contains(set) {
                Ok(Labels::PromptSet(set.clone()))
            } else if state.info.prompt_sets.is_empty() {
                Err(ApiError::bad(format!(
                    "unknown prompt set {set:?}: the server was started without --prompts"
                )))
            } else {
                Err(ApiError::bad(format!(
                    "unknown prompt set {set:?}; known: {}",
                    state.info.prompt_sets.join(", ")
                )))
            }
        }
        (Some(list), None) => {
            let names: Vec<String> = list
                .split(',')
                .map(|l| l.trim().to_string())
                .filter(|l| !l.is_empty())
                .collect();
            if names.is_empty() {
                return Err(ApiError::bad(
                    "the label list is empty: give at least one label name",
                ));
            }
            Ok(Labels::Names(names))
        }
    }
}

/// The student input of an upload, and the input of `teacher` when given, decoded off the
/// async threads.
async fn decode(
    state: &AppState,
    image: Bytes,
    teacher: Option<TeacherView>,
) -> Result<(Tensor, Option<TeacherImage>), ApiError> {
    let max = state.limits.pixels;
    let decoded = tokio::task::spawn_blocking(move || {
        let image = decode_image(&image, max)?;
        let student = student_input_of(&image)?;
        Ok::<_, BadImage>((student, teacher.map(|t| t.image(&image))))
    })
    .await
    .map_err(|_| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "decoding failed"))?;
    decoded.map_err(|e| {
        let status = match e {
            BadImage::TooManyPixels { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            _ => StatusCode::BAD_REQUEST,
        };
        ApiError::new(status, e.to_string())
    })
}

/// Runs a job, turning the model's refusals into client errors.
async fn answer(state: &AppState, job: Job) -> Result<(Answer, Value), ApiError> {
    let (answer, timing) = state.engine.submit(job).await?;
    let timing = json!({
        "queued_ms": timing.queued.as_secs_f64() * 1e3,
        "model_ms": timing.model.as_secs_f64() * 1e3,
        "batch_size": timing.batch_size,
    });
    match answer {
        Answer::Rejected(msg) => Err(ApiError::bad(msg)),
        Answer::Failed(msg) => Err(ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, msg)),
        other => Ok((other, timing)),
    }
}

async fn classify(
    State(state): State<AppState>,
    request: Request,
) -> Result<Json<Value>, ApiError> {
    let start = Instant::now();
    let Upload { image, options } = upload(&state, request).await?;
    let labels = labels(&state, &options)?;
    let (image, teacher_image) = decode(&state, image, state.teacher.clone()).await?;
    let job = Job::Classify {
        image,
        teacher_image,
        labels,
        raster: options.raster,
    };
    let (answer, timing) = answer(&state, job).await?;
    let Answer::Classified(c) = answer else {
        return Err(ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "the model answered a classify job with something else",
        ));
    };
    let mut body = serde_json::to_value(&*c)
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    body["timing"] = timing;
    body["timing"]["total_ms"] = json!(start.elapsed().as_secs_f64() * 1e3);
    Ok(Json(body))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct EmbedTexts {
    texts: Vec<String>,
}

/// Text features for `{"texts": [...]}` (JSON), image features for an image upload.
async fn embed(State(state): State<AppState>, request: Request) -> Result<Json<Value>, ApiError> {
    let is_json = request
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    let (job, kind) = if is_json {
        let Json(EmbedTexts { texts }) = Json::<EmbedTexts>::from_request(request, &state)
            .await
            .map_err(|e| ApiError::new(e.status(), e.body_text()))?;
        if texts.is_empty() || texts.iter().any(|t| t.trim().is_empty()) {
            return Err(ApiError::bad(
                "texts must be a non-empty list of non-empty strings",
            ));
        }
        (Job::EmbedText { texts }, "text")
    } else {
        let Upload { image, .. } = upload(&state, request).await?;
        let (image, _) = decode(&state, image, None).await?;
        (Job::EmbedImage { image }, "image")
    };
    let (answer, timing) = answer(&state, job).await?;
    let Answer::Features(features) = answer else {
        return Err(ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "the model answered an embed job with something else",
        ));
    };
    Ok(Json(json!({
        "kind": kind,
        "dim": features.first().map_or(0, Vec::len),
        "features": features,
        "timing": timing,
    })))
}
