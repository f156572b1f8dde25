//! The worker's view of the coordinator's two channels, put back in one order.
//!
//! The coordinator sends each worker one sequence of messages; parameter chunks go on the data
//! connection and the rest on the Session. Each carries how many of the other kind were sent
//! before it (`data_frames_before`, `session_messages_before`), so of the two oldest messages
//! not yet handled, exactly the one that was sent first has all its predecessors handled.

use std::collections::VecDeque;

use crate::pb;

/// Messages received on either channel, released in the coordinator's send order.
#[derive(Debug, Default)]
pub struct InOrder {
    session: VecDeque<pb::CoordinatorMessage>,
    data: VecDeque<pb::ParamsChunk>,
    session_taken: u64,
    data_taken: u64,
}

impl InOrder {
    pub fn new() -> Self {
        Self::default()
    }

    /// A message from the Session, in the order it arrived there.
    pub fn push_session(&mut self, message: pb::CoordinatorMessage) {
        self.session.push_back(message);
    }

    /// A frame from the data connection, in the order it arrived there.
    pub fn push_data(&mut self, chunk: pb::ParamsChunk) {
        self.data.push_back(chunk);
    }

    /// The next message in send order, once everything sent before it has been released.
    pub fn pop(&mut self) -> Option<pb::CoordinatorMessage> {
        if self
            .session
            .front()
            .is_some_and(|m| m.data_frames_before <= self.data_taken)
        {
            self.session_taken += 1;
            return self.session.pop_front();
        }
        if self
            .data
            .front()
            .is_some_and(|c| c.session_messages_before <= self.session_taken)
        {
            self.data_taken += 1;
            let chunk = self.data.pop_front().expect("checked above");
            return Some(pb::CoordinatorMessage {
                data_frames_before: 0,
                kind: Some(pb::coordinator_message::Kind::Params(chunk)),
            });
        }
        None
    }

    /// Messages received but not yet released.
    pub fn waiting(&self) -> usize {
        self.session.len() + self.data.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pb::coordinator_message::Kind;

    /// A send order: `true` is a data frame, `false` a Session message. Each message's step
    /// field holds its position, so the released order can be read back.
    fn stamped(order: &[bool]) -> (Vec<pb::CoordinatorMessage>, Vec<pb::ParamsChunk>) {
        let (mut session, mut data) = (Vec::new(), Vec::new());
        for (position, &is_data) in order.iter().enumerate() {
            let step = position as u64;
            if is_data {
                data.push(pb::ParamsChunk {
                    step,
                    session_messages_before: session.len() as u64,
                    ..Default::default()
                });
            } else {
                session.push(pb::CoordinatorMessage {
                    data_frames_before: data.len() as u64,
                    kind: Some(Kind::Plan(pb::Plan {
                        step,
                        ..Default::default()
                    })),
                });
            }
        }
        (session, data)
    }

    fn position(message: &pb::CoordinatorMessage) -> u64 {
        match message.kind.as_ref().unwrap() {
            Kind::Params(c) => c.step,
            Kind::Plan(p) => p.step,
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn every_arrival_interleaving_comes_out_in_send_order() {
        // All send orders of 8 messages, each received under several interleavings of the
        // two channels (each channel keeps its own order, as TCP does).
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        for pattern in 0u32..256 {
            let order: Vec<bool> = (0..8).map(|bit| pattern >> bit & 1 == 1).collect();
            for _ in 0..8 {
                let (session, data) = stamped(&order);
                let (mut session, mut data) = (session.into_iter(), data.into_iter());
                let mut merged = InOrder::new();
                let mut released = Vec::new();
                loop {
                    state = state.wrapping_mul(6364136223846793005).wrapping_add(1);
                    let from_data = state >> 63 == 1;
                    let arrived = if from_data {
                        data.next().map(|c| merged.push_data(c))
                    } else {
                        session.next().map(|m| merged.push_session(m))
                    };
                    while let Some(message) = merged.pop() {
                        released.push(position(&message));
                    }
                    if arrived.is_none() && data.len() == 0 && session.len() == 0 {
                        break;
                    }
                }
                assert_eq!(released, (0..8).collect::<Vec<u64>>(), "send order {order:?}");
                assert_eq!(merged.waiting(), 0);
            }
        }
    }

    #[test]
    fn a_message_waits_for_the_frames_sent_before_it() {
        let (session, data) = stamped(&[true, true, false]);
        let mut merged = InOrder::new();
        merged.push_session(session[0].clone());
        assert!(merged.pop().is_none());
        merged.push_data(data[0].clone());
        assert_eq!(merged.pop().map(|m| position(&m)), Some(0));
        assert!(merged.pop().is_none());
        merged.push_data(data[1].clone());
        assert_eq!(merged.pop().map(|m| position(&m)), Some(1));
        assert_eq!(merged.pop().map(|m| position(&m)), Some(2));
    }
}
