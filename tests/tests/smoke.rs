#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    reason = "tests"
)]

use prism_stack::Config;
use prism_tests::{Client, start_stack};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test]
async fn echo_through_the_stack() {
    let (link, mut requests, counters) = start_stack(Config::default());
    tokio::spawn(async move {
        while let Some(request) = requests.next().await {
            let mut stream = request.accept();
            tokio::spawn(async move {
                let mut buf = vec![0; 4096];
                loop {
                    let n = stream.read(&mut buf).await.unwrap();
                    if n == 0 {
                        stream.shutdown().await.unwrap();
                        break;
                    }
                    stream.write_all(&buf[..n]).await.unwrap();
                }
            });
        }
    });
    let mut client = Client::new(link);
    let h = client.connect(
        "10.0.0.2:40000".parse().unwrap(),
        "192.0.2.1:80".parse().unwrap(),
        65536,
    );
    client
        .until("established", |c| c.socket(h).may_send().then_some(()))
        .await;
    client.send_all(h, b"hello prism").await;
    client.socket(h).close();
    let echoed = client.recv_to_end(h).await;
    assert_eq!(echoed, b"hello prism");
    eprintln!("{}", counters.snapshot());
}
