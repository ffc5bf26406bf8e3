//! `crate-mae-cli`: a command-line client for the CRATE-MAE gRPC server.
//!
//! Subcommands: `embed` (one embedding per image), `complete` (masked completion, written as a
//! side-by-side PNG: original | masked input | reconstruction), `info` (GetModelInfo as JSON)
//! and `health` (gRPC health check; exit 0 only when SERVING).
//!
//! Examples:
//!
//! ```text
//! crate-mae-cli --addr http://127.0.0.1:50051 embed --pooling mean --normalize cat.png dog.jpg
//! crate-mae-cli complete cat.png -o cat_completion.png --mask-ratio 0.75 --seed 7
//! crate-mae-cli info
//! crate-mae-cli health
//! ```
//!
//! Exit codes: 0 success, 1 health check answered but not SERVING, 2 gRPC or local error
//! (the gRPC status code and message are printed to stderr).

use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Args, Parser, Subcommand, ValueEnum};
use crate_mae_server::engine::MaskSpec;
use crate_mae_server::pb::crate_mae_client::CrateMaeClient;
use crate_mae_server::{client, imaging, pb};
use image::{imageops::FilterType, RgbImage};
use serde_json::{json, Value};
use tonic::metadata::{Ascii, MetadataValue};
use tonic::transport::Channel;
use tonic::{Code, Request, Status};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

/// White gap between the panels of the `complete` output.
const PANEL_GAP: u32 = 2;

#[derive(Parser, Debug)]
#[command(
    name = "crate-mae-cli",
    version,
    about = "Command-line client for the CRATE-MAE gRPC server"
)]
struct Cli {
    #[command(flatten)]
    server: client::ServerArgs,
    /// Per-call deadline in seconds (also sent to the server as grpc-timeout).
    #[arg(long, default_value_t = 30.0)]
    timeout: f64,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Embed images (one request, one embedding per image, in order).
    Embed {
        /// PNG or JPEG files.
        #[arg(required = true)]
        images: Vec<PathBuf>,
        /// Pooling of the encoder tokens (default: the model's recommendation, as the server
        /// applies it when none is asked for).
        #[arg(long, value_enum)]
        pooling: Option<PoolingArg>,
        /// Scale each embedding to unit L2 norm.
        #[arg(long)]
        normalize: bool,
        /// Pool the output of this encoder layer (0-based) instead of the final tokens.
        #[arg(long)]
        layer: Option<u32>,
        /// Request per-layer white-box diagnostics (to stderr, or in the JSON output).
        #[arg(long)]
        diagnostics: bool,
        /// Print a JSON array of {path, embedding, diagnostics} instead of TSV lines.
        #[arg(long)]
        json: bool,
    },
    /// Mask patches of images, let the model fill them in, write one PNG grid.
    Complete(CompleteArgs),
    /// Print the served model's configuration as JSON.
    Info,
    /// gRPC health check; exits 0 only if SERVING.
    Health {
        /// Service name ("" = the whole server).
        #[arg(long, default_value = "")]
        service: String,
    },
}

#[derive(Args, Debug)]
struct CompleteArgs {
    /// PNG or JPEG files; each becomes one row (or column) of the output.
    #[arg(required = true)]
    images: Vec<PathBuf>,
    /// Output image: per input, original | masked input | completion.
    #[arg(short, long)]
    output: PathBuf,
    /// Fraction of patches to hide, in [0, 1).
    #[arg(long, default_value_t = MaskSpec::DEFAULT_RATIO)]
    mask_ratio: f32,
    /// Seed of the random mask (image i uses seed + i, so the masks differ).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Hide exactly these patches (row-major indices) instead of a random mask.
    #[arg(long, value_delimiter = ',')]
    mask_patches: Vec<u32>,
    /// Also write the raw reconstruction PNG (every patch predicted) here (one input only).
    #[arg(long)]
    raw_output: Option<PathBuf>,
    /// Enlarge every panel this many times (nearest neighbour; small models serve 32 px).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=16))]
    scale: u32,
    /// One column per image (original, masked, completion from top to bottom) instead of
    /// one row per image.
    #[arg(long)]
    columns: bool,
}

#[derive(ValueEnum, Clone, Copy, Debug)]
enum PoolingArg {
    Cls,
    Mean,
    /// The model's whitened grid readout (the built-in model's default).
    WhitenedGrid,
}

impl From<PoolingArg> for pb::Pooling {
    fn from(p: PoolingArg) -> Self {
        match p {
            PoolingArg::Cls => pb::Pooling::Cls,
            PoolingArg::Mean => pb::Pooling::Mean,
            PoolingArg::WhitenedGrid => pb::Pooling::WhitenedGrid,
        }
    }
}

/// What makes the CLI fail: a gRPC status (from the server or the transport) or a local error.
enum Failure {
    Grpc(Status),
    Local(anyhow::Error),
}

impl From<Status> for Failure {
    fn from(s: Status) -> Self {
        Failure::Grpc(s)
    }
}

impl From<anyhow::Error> for Failure {
    fn from(e: anyhow::Error) -> Self {
        Failure::Local(e)
    }
}

type CliResult<T> = Result<T, Failure>;

/// Connection and per-call settings shared by all subcommands.
struct Ctx {
    channel: Channel,
    timeout: Duration,
    auth: Option<MetadataValue<Ascii>>,
}

impl Ctx {
    fn new(cli: &Cli) -> anyhow::Result<Self> {
        let timeout = client::positive_seconds("--timeout", cli.timeout)?;
        let endpoint = cli.server.endpoint(timeout.min(Duration::from_secs(10)))?;
        // Lazy: connection failures surface as UNAVAILABLE statuses on the first call.
        let channel = endpoint.connect_lazy();
        let auth = cli.server.bearer()?;
        Ok(Ctx {
            channel,
            timeout,
            auth,
        })
    }

    fn client(&self) -> CrateMaeClient<Channel> {
        client::crate_mae(self.channel.clone())
    }

    fn request<T>(&self, message: T) -> Request<T> {
        let mut req = Request::new(message);
        req.set_timeout(self.timeout);
        if let Some(auth) = &self.auth {
            req.metadata_mut().insert("authorization", auth.clone());
        }
        req
    }

    /// Runs one call under the client-side deadline (DEADLINE_EXCEEDED when it elapses).
    async fn call<T, F>(&self, fut: F) -> Result<T, Status>
    where
        F: Future<Output = Result<tonic::Response<T>, Status>>,
    {
        let started = Instant::now();
        match tokio::time::timeout(self.timeout, fut).await {
            // A server honouring grpc-timeout (tonic's does) answers CANCELLED "Timeout
            // expired" when the deadline passes: from here, the deadline was exceeded.
            Ok(Err(status))
                if status.code() == Code::Cancelled && started.elapsed() >= self.timeout =>
            {
                Err(Status::deadline_exceeded(format!(
                    "deadline exceeded after {:.3} s (server: {})",
                    self.timeout.as_secs_f64(),
                    status.message()
                )))
            }
            Ok(r) => r.map(tonic::Response::into_inner),
            Err(_) => Err(Status::deadline_exceeded(format!(
                "no response within {:.3} s (client deadline)",
                self.timeout.as_secs_f64()
            ))),
        }
    }
}

/// The status message, followed by the messages of its source chain (transport errors) that
/// add something, e.g. "tcp connect error: Connection refused (os error 111)".
fn status_detail(status: &Status) -> String {
    let mut text = status.message().to_string();
    let mut source = std::error::Error::source(status);
    while let Some(err) = source {
        let msg = err.to_string();
        if !text.contains(&msg) {
            text.push_str(": ");
            text.push_str(&msg);
        }
        source = err.source();
    }
    text
}

fn read_file(path: &Path) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| anyhow::anyhow!("cannot read {}: {e}", path.display()))
}

fn encoded_image(bytes: Vec<u8>) -> pb::Image {
    pb::Image {
        encoded: bytes,
        tensor: None,
    }
}

fn diagnostics_json(diags: &[pb::LayerDiagnostics]) -> Value {
    Value::Array(
        diags
            .iter()
            .map(|d| {
                json!({
                    "layer": d.layer,
                    "coding_rate": d.coding_rate,
                    "expansion_rate": d.expansion_rate,
                    "rate_reduction": d.rate_reduction,
                    "sparsity": d.sparsity,
                })
            })
            .collect(),
    )
}

fn timing_text(t: Option<&pb::Timing>) -> String {
    match t {
        Some(t) => format!(
            "queue {:.2} ms, inference {:.2} ms, batch of {}",
            t.queue_seconds * 1e3,
            t.inference_seconds * 1e3,
            t.batch_size
        ),
        None => "no server timing".to_string(),
    }
}

async fn embed(
    ctx: &Ctx,
    images: &[PathBuf],
    pooling: Option<PoolingArg>,
    normalize: bool,
    layer: Option<u32>,
    diagnostics: bool,
    as_json: bool,
) -> CliResult<()> {
    let encoded = images
        .iter()
        .map(|p| read_file(p).map(encoded_image))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let request = pb::EmbedRequest {
        images: encoded,
        pooling: pooling.map_or(pb::Pooling::Unspecified, pb::Pooling::from) as i32,
        layer,
        normalize,
        include_diagnostics: diagnostics,
        ..Default::default()
    };
    let mut client = ctx.client();
    let started = Instant::now();
    let response = ctx.call(client.embed(ctx.request(request))).await?;
    let elapsed = started.elapsed();
    if response.embeddings.len() != images.len() {
        return Err(anyhow::anyhow!(
            "server returned {} embeddings for {} images",
            response.embeddings.len(),
            images.len()
        )
        .into());
    }

    if as_json {
        let items: Vec<Value> = images
            .iter()
            .zip(&response.embeddings)
            .map(|(path, emb)| {
                let mut obj = json!({
                    "path": path.display().to_string(),
                    "embedding": emb.values,
                });
                if diagnostics {
                    obj["diagnostics"] = diagnostics_json(&emb.diagnostics);
                }
                obj
            })
            .collect();
        println!(
            "{}",
            serde_json::to_string_pretty(&Value::Array(items)).map_err(anyhow::Error::from)?
        );
    } else {
        for (path, emb) in images.iter().zip(&response.embeddings) {
            let values: Vec<String> = emb.values.iter().map(|v| v.to_string()).collect();
            println!("{}\t{}", path.display(), values.join(","));
            if diagnostics {
                for d in &emb.diagnostics {
                    eprintln!(
                        "{}\tlayer {:>2}  R {:>10.4}  R^c {:>10.4}  R-R^c {:>10.4}  sparsity {:.4}",
                        path.display(),
                        d.layer,
                        d.expansion_rate,
                        d.coding_rate,
                        d.rate_reduction,
                        d.sparsity
                    );
                }
            }
        }
    }
    eprintln!(
        "{} embeddings of dim {} in {:.2} ms ({})",
        response.embeddings.len(),
        response.dim,
        elapsed.as_secs_f64() * 1e3,
        timing_text(response.timing.as_ref())
    );
    Ok(())
}

/// The image as the server's model sees it: the server's own preprocessing (decode, crop,
/// resize, normalise with the model's mean and std) and back to RGB.
fn preprocess_for_display(bytes: &[u8], info: &pb::ModelInfo) -> anyhow::Result<RgbImage> {
    let three = |v: &[f32], what: &str| -> anyhow::Result<[f32; 3]> {
        v.try_into()
            .map_err(|_| anyhow::anyhow!("the server's model info has {} {what} values", v.len()))
    };
    let prep = imaging::Preprocessing {
        image_size: info.image_size,
        mean: three(&info.mean, "mean")?,
        std: three(&info.std, "std")?,
        // A local guard only: the server applies its own limit to what it is sent.
        max_pixels: 40_000_000,
        small_image_fit: info.small_image_fit.parse().unwrap_or_default(),
    };
    let pixels = prep.encoded(bytes)?;
    Ok(prep.to_rgb(&pixels))
}

fn decode_png(bytes: &[u8], what: &str) -> anyhow::Result<RgbImage> {
    image::load_from_memory(bytes)
        .map(|i| i.to_rgb8())
        .map_err(|e| anyhow::anyhow!("cannot decode the server's {what} image: {e}"))
}

/// Panels left to right on a white canvas, `PANEL_GAP` pixels apart, top-aligned.
/// Panels in a row (or, `vertical`, a column) with white gaps between them.
fn tile(panels: &[&RgbImage], vertical: bool) -> RgbImage {
    let gaps = PANEL_GAP * (panels.len().saturating_sub(1) as u32);
    let along = |p: &RgbImage| if vertical { p.height() } else { p.width() };
    let across = |p: &RgbImage| if vertical { p.width() } else { p.height() };
    let length = panels.iter().map(|p| along(p)).sum::<u32>() + gaps;
    let breadth = panels.iter().map(|p| across(p)).max().unwrap_or(0);
    let (w, h) = if vertical {
        (breadth, length)
    } else {
        (length, breadth)
    };
    let mut canvas = RgbImage::from_pixel(w, h, image::Rgb([255, 255, 255]));
    let mut offset = 0i64;
    for p in panels {
        let (x, y) = if vertical { (0, offset) } else { (offset, 0) };
        image::imageops::replace(&mut canvas, *p, x, y);
        offset += (along(p) + PANEL_GAP) as i64;
    }
    canvas
}

async fn complete(ctx: &Ctx, args: &CompleteArgs) -> CliResult<()> {
    if args.raw_output.is_some() && args.images.len() > 1 {
        return Err(anyhow::anyhow!("--raw-output takes a single input image").into());
    }
    let mut client = ctx.client();
    let info = ctx
        .call(client.get_model_info(ctx.request(pb::GetModelInfoRequest {})))
        .await?;
    let mut strips = Vec::with_capacity(args.images.len());
    for (i, image_path) in args.images.iter().enumerate() {
        let panels = complete_one(
            ctx,
            &mut client,
            &info,
            image_path,
            MaskSpec::seed_of(args.seed, i),
            args,
        )
        .await?
        .map(|p| enlarge(p, args.scale));
        strips.push(tile(&panels.each_ref(), args.columns));
    }
    let canvas = tile(&strips.iter().collect::<Vec<_>>(), !args.columns);
    canvas
        .save(&args.output)
        .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", args.output.display()))?;
    eprintln!("wrote {}", args.output.display());
    Ok(())
}

fn enlarge(panel: RgbImage, scale: u32) -> RgbImage {
    if scale == 1 {
        return panel;
    }
    let (w, h) = panel.dimensions();
    image::imageops::resize(&panel, w * scale, h * scale, FilterType::Nearest)
}

/// One completion: the panels original, masked input, composite.
async fn complete_one(
    ctx: &Ctx,
    client: &mut CrateMaeClient<Channel>,
    info: &pb::ModelInfo,
    image_path: &Path,
    seed: u64,
    args: &CompleteArgs,
) -> CliResult<[RgbImage; 3]> {
    let bytes = read_file(image_path)?;
    let original = preprocess_for_display(&bytes, info)
        .map_err(|e| anyhow::anyhow!("cannot decode {}: {e}", image_path.display()))?;

    let request = pb::CompleteRequest {
        image: Some(encoded_image(bytes)),
        mask_ratio: args.mask_ratio,
        seed,
        masked_patches: args.mask_patches.clone(),
        include_diagnostics: false,
    };
    let started = Instant::now();
    let response = ctx.call(client.complete(ctx.request(request))).await?;
    let elapsed = started.elapsed();

    let masked = decode_png(&response.masked_input, "masked_input")?;
    let composite = decode_png(&response.composite, "composite")?;
    if let Some(raw) = &args.raw_output {
        std::fs::write(raw, &response.reconstruction)
            .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", raw.display()))?;
    }

    let grid = response.grid_size;
    eprintln!(
        "{}: masked {} of {} patches (grid {grid}x{grid}); masked_patch_mse {:.6}",
        image_path.display(),
        response.masked_patches.len(),
        grid * grid,
        response.masked_patch_mse
    );
    eprintln!(
        "round trip {:.2} ms ({})",
        elapsed.as_secs_f64() * 1e3,
        timing_text(response.timing.as_ref())
    );
    if let Some(raw) = &args.raw_output {
        eprintln!("wrote {}", raw.display());
    }
    Ok([original, masked, composite])
}

fn model_info_json(m: &pb::ModelInfo) -> Value {
    json!({
        "name": m.name,
        "version": m.version,
        "image_size": m.image_size,
        "patch_size": m.patch_size,
        "in_chans": m.in_chans,
        "dim": m.dim,
        "depth": m.depth,
        "heads": m.heads,
        "decoder_depth": m.decoder_depth,
        "ista_step_size": m.ista_step_size,
        "lambd": m.lambd,
        "parameter_count": m.parameter_count,
        "mean": m.mean,
        "std": m.std,
        "weights_source": m.weights_source,
        "weights_sha256": m.weights_sha256,
        "weights_format": m.weights_format,
        "random_weights": m.random_weights,
        "device": m.device,
        "diagnostics_available": m.diagnostics_available,
        "diagnostics": m.diagnostics,
        "max_batch_size": m.max_batch_size,
        "max_images_per_request": m.max_images_per_request,
    })
}

async fn info(ctx: &Ctx) -> CliResult<()> {
    let mut client = ctx.client();
    let info = ctx
        .call(client.get_model_info(ctx.request(pb::GetModelInfoRequest {})))
        .await?;
    println!(
        "{}",
        serde_json::to_string_pretty(&model_info_json(&info)).map_err(anyhow::Error::from)?
    );
    Ok(())
}

/// Returns whether the service is SERVING.
async fn health(ctx: &Ctx, service: String) -> CliResult<bool> {
    let mut client = HealthClient::new(ctx.channel.clone());
    let response = ctx
        .call(client.check(ctx.request(HealthCheckRequest { service })))
        .await?;
    let status = ServingStatus::try_from(response.status);
    match status {
        Ok(s) => println!("{}", s.as_str_name()),
        Err(_) => println!("UNRECOGNISED({})", response.status),
    }
    Ok(status == Ok(ServingStatus::Serving))
}

async fn run(cli: Cli) -> CliResult<ExitCode> {
    let ctx = Ctx::new(&cli)?;
    match cli.command {
        Command::Embed {
            images,
            pooling,
            normalize,
            layer,
            diagnostics,
            json,
        } => embed(&ctx, &images, pooling, normalize, layer, diagnostics, json).await?,
        Command::Complete(args) => complete(&ctx, &args).await?,
        Command::Info => info(&ctx).await?,
        Command::Health { service } => {
            if !health(&ctx, service).await? {
                return Ok(ExitCode::from(1));
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli).await {
        Ok(code) => code,
        Err(Failure::Grpc(status)) => {
            eprintln!(
                "error: {}: {}",
                crate_mae_server::client::code_name(status.code()),
                status_detail(&status)
            );
            ExitCode::from(2)
        }
        Err(Failure::Local(e)) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}
