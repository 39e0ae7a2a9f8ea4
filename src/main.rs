mod demo_app;
#[derive(clap::Parser)]
#[command(version)]
enum Cli {
    DemoApp(demo_app::DemoAppArgs),
}
#[tokio::main]
async fn main() -> anyhow::Result<()> {
    use clap::Parser;
    tracing_subscriber::fmt::init();
    let Cli::DemoApp(a) = Cli::parse();
    demo_app::run(a, async {
        let _ = tokio::signal::ctrl_c().await;
    })
    .await
}
