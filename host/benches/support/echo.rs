//! The raw baseline servers' loop: take a request, publish its answer, wait for the broker's confirm when asked, then ack.

use futures_util::StreamExt;
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection};

/// Where and what a raw server answers.
pub struct Answer {
    /// The exchange to publish to (`""`: the default exchange).
    pub exchange: String,
    /// The routing key.
    pub routing_key: String,
    /// The body.
    pub body: Vec<u8>,
    /// The properties (the correlation id at least).
    pub properties: BasicProperties,
}

/// Consumes `queue` on `conn` with a prefetch of `prefetch` and answers
/// every request as `answer` says, each in a task of its own. With
/// `confirms`, a request is acked only once its answer is confirmed:
/// callme's guarantee, without anything else callme does.
pub async fn answer_each(
    conn: &Connection,
    queue: &str,
    prefetch: u16,
    confirms: bool,
    answer: fn(&Delivery) -> Answer,
) -> anyhow::Result<()> {
    let ch = conn.create_channel().await?;
    ch.basic_qos(prefetch, BasicQosOptions::default()).await?;
    let mut consumer = ch
        .basic_consume(
            queue.into(),
            "echo".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let reply_ch = conn.create_channel().await?;
    if confirms {
        reply_ch
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
    }
    tokio::spawn(async move {
        while let Some(Ok(d)) = consumer.next().await {
            let reply_ch = reply_ch.clone();
            tokio::spawn(async move {
                let a = answer(&d);
                let published = reply_ch
                    .basic_publish(
                        a.exchange.as_str().into(),
                        a.routing_key.as_str().into(),
                        BasicPublishOptions::default(),
                        &a.body,
                        a.properties,
                    )
                    .await;
                if let Ok(confirm) = published
                    && confirms
                {
                    let _ = confirm.await;
                }
                let _ = d.ack(BasicAckOptions::default()).await;
            });
        }
    });
    Ok(())
}
