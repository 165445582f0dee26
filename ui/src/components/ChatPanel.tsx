import { useCallback, useEffect, useId, useMemo, useRef, useState, type FormEvent, type KeyboardEvent } from "react";
import { Code, ConnectError } from "@connectrpc/connect";
import {
  Agent,
  HistoryOrder,
  MessageRole,
  type ChatMessage,
  type Model,
} from "@gen/opsmesh/chat/v1/chat_pb.js";
import type { MessageInitShape } from "@bufbuild/protobuf";
import type { StreamChatRequestSchema } from "@gen/opsmesh/chat/v1/chat_pb.js";
import { describeError } from "../api/errors";
import type { Api } from "../api/transport";
import type { AuthClient } from "../auth/auth";
import { answerDetails } from "../chat/history";
import {
  ANSWER_POLL,
  findAnswer,
  nextDelay,
  pendingCalls,
  settled,
  toolCallIds,
  withAnswer,
  type PendingCall,
} from "../chat/pending";
import {
  applyEvent,
  fail,
  finishDecision,
  finishToolDecision,
  newTurn,
  startDecision,
  startToolDecision,
  type Decision,
  type ToolActivity,
  type Turn,
} from "../chat/turn";
import { AnswerText, preloadMarkdown } from "./AnswerText";
import { ProblemNotice } from "./ProblemNotice";
import { ToolCard } from "./ToolCard";

const HISTORY_PAGE = 30;
/** After StopGeneration, how long the stream may take to close on its own before we cut it. */
const STOP_GRACE_MS = 3000;

const AGENTS: { value: Agent; label: string }[] = [
  { value: Agent.UNSPECIFIED, label: "Assistant" },
  { value: Agent.MONITORING, label: "Monitoring" },
  { value: Agent.OPERATIONS, label: "Operations" },
  { value: Agent.TROUBLESHOOTING, label: "Troubleshooting" },
];

const AGENT_NAMES: Record<string, string> = {
  monitoring: "Monitoring",
  operations: "Operations",
  troubleshooting: "Troubleshooting",
};

/** Why a decision did not take, when DecideToolCall answered accepted=false. */
const NOT_WAITING = "the call no longer waits for a decision (decided before, or timed out)";

function speaker(agent: string | undefined, model: string | undefined): string {
  return ["Assistant", agent, model].filter(Boolean).join(" · ");
}

/** Waits `ms`, or less when `signal` aborts. */
function sleep(ms: number, signal: AbortSignal): Promise<void> {
  return new Promise((resolve) => {
    const done = () => {
      window.clearTimeout(timer);
      signal.removeEventListener("abort", done);
      resolve();
    };
    const timer = window.setTimeout(done, ms);
    signal.addEventListener("abort", done);
  });
}

/** A tool call of an earlier generation waiting for a decision: the approval card, then how its answer comes on. */
function PendingCard({ call, onDecide }: { call: PendingCall; onDecide: (call: PendingCall, decision: Decision) => void }) {
  return (
    <div className="pending-call" data-testid="pending-call">
      <ToolCard tool={call.tool} onDecide={call.phase === "open" ? (d) => onDecide(call, d) : undefined} />
      <p className="muted" aria-live="polite" data-testid="pending-answer">
        {call.phase === "answering" ? "Waiting for the answer…" : null}
        {call.phase === "late" ? "The answer has not arrived yet; it will show in the history when it does." : null}
      </p>
    </div>
  );
}

/** A stored message: an assistant's answer shows its tool cards first, then its text. */
function HistoryMessage({
  message,
  pending,
  decided,
  onDecide,
}: {
  message: ChatMessage;
  /** Calls waiting for a decision, by tool call id: shown with their Approve / Reject buttons. */
  pending: ReadonlyMap<string, PendingCall>;
  /** Decisions made here, by tool call id, that the stored log may not have yet. */
  decided: ReadonlyMap<string, Decision>;
  onDecide: (call: PendingCall, decision: Decision) => void;
}) {
  const role = roleName(message.role);
  const details = message.role === MessageRole.ASSISTANT ? answerDetails(message.metadata) : undefined;
  const agent = details?.agent ? (AGENT_NAMES[details.agent] ?? details.agent) : undefined;
  return (
    <article className={`message message-${role.toLowerCase()}`} data-testid="history-message">
      <h2 className="speaker">{details ? speaker(agent, details.model) : role}</h2>
      {details?.tools.map((tool) => {
        const call = pending.get(tool.id);
        return call ? (
          <PendingCard key={tool.id} call={call} onDecide={onDecide} />
        ) : (
          <ToolCard key={tool.id} tool={settled(tool, decided.get(tool.id))} />
        );
      })}
      {details ? (
        <div className="text markdown">
          <AnswerText text={message.content} streaming={false} />
        </div>
      ) : (
        <p className="text">{message.content}</p>
      )}
      {message.incomplete ? <p className="muted">(stopped before the end)</p> : null}
    </article>
  );
}

function roleName(role: MessageRole): string {
  switch (role) {
    case MessageRole.USER:
      return "You";
    case MessageRole.ASSISTANT:
      return "Assistant";
    case MessageRole.TOOL:
      return "Tool";
    default:
      return "System";
  }
}

export function ChatPanel({
  api,
  auth,
  sessionId,
  onError,
  focusComposer = false,
}: {
  api: Api;
  auth: Pick<AuthClient, "refresh">;
  sessionId: string;
  onError: (error: unknown) => void;
  focusComposer?: boolean;
}) {
  const [history, setHistory] = useState<ChatMessage[]>([]);
  const [olderPage, setOlderPage] = useState("");
  const [historyLoaded, setHistoryLoaded] = useState(false);
  const [turns, setTurns] = useState<Turn[]>([]);
  const [draft, setDraft] = useState("");
  const [agent, setAgent] = useState<Agent>(Agent.UNSPECIFIED);
  const [models, setModels] = useState<Model[]>([]);
  const [model, setModel] = useState("");
  const [pending, setPending] = useState<PendingCall[]>([]);
  const [decided, setDecided] = useState<ReadonlyMap<string, Decision>>(new Map());
  const abortRef = useRef<AbortController | null>(null);
  const endRef = useRef<HTMLDivElement | null>(null);
  /** The messages shown, for the answer polls to tell new ones from known ones. */
  const historyRef = useRef<ChatMessage[]>([]);
  /** The answer polls running for this session; aborted when the session changes or the panel goes. */
  const pollsRef = useRef(new Set<AbortController>());
  const pendingHeading = useId();

  const running = turns.find((t) => t.status === "waiting" || t.status === "streaming");

  const loadHistory = useCallback(
    async (pageToken: string) => {
      try {
        const page = await api.chat.getHistory({
          sessionId,
          pageSize: HISTORY_PAGE,
          pageToken,
          order: HistoryOrder.NEWEST_FIRST,
        });
        const older = [...page.messages].reverse();
        setHistory((known) => {
          if (!pageToken) return older;
          const shown = new Set(known.map((m) => m.id)); // an answer added meanwhile may be on this page too
          return [...older.filter((m) => !shown.has(m.id)), ...known];
        });
        setOlderPage(page.nextPageToken);
      } catch (error) {
        onError(error);
      } finally {
        setHistoryLoaded(true);
      }
    },
    [api, sessionId, onError],
  );

  useEffect(() => {
    historyRef.current = history;
  }, [history]);

  useEffect(() => {
    preloadMarkdown();
    // The history first, so the waiting calls can join the answers they belong to.
    const controller = new AbortController();
    setPending([]);
    setDecided(new Map());
    void (async () => {
      await loadHistory("");
      if (controller.signal.aborted) return;
      try {
        const reply = await api.chat.listApprovals({ sessionId }, { signal: controller.signal });
        if (!controller.signal.aborted) setPending(pendingCalls(reply.approvals));
      } catch (error) {
        // Without the list the chat still works: the calls show as waiting, without buttons.
        if (!controller.signal.aborted && describeError(error).signIn) onError(error);
      }
    })();
    return () => {
      controller.abort(); // a late answer is for the session that was open, not this one
      abortRef.current?.abort();
    };
  }, [loadHistory, api, sessionId, onError]);

  useEffect(() => {
    const polls = pollsRef.current;
    return () => {
      for (const poll of polls) poll.abort(); // the session changed, or the panel went
      polls.clear();
    };
  }, [sessionId]);

  useEffect(() => {
    api.chat
      .listModels({})
      .then((reply) => {
        const allowed = reply.models.filter((m) => m.allowed);
        setModels(allowed);
        setModel((current) => current || allowed.find((m) => m.isDefault)?.name || "");
      })
      .catch(() => setModels([])); // the model server may be down; the default model still applies
  }, [api]);

  useEffect(() => {
    endRef.current?.scrollIntoView?.({ block: "end" });
  }, [turns, history]);

  const update = (key: string, change: (turn: Turn) => Turn) =>
    setTurns((all) => all.map((turn) => (turn.key === key ? change(turn) : turn)));

  const send = async (text: string) => {
    const key = crypto.randomUUID();
    const agentName = agent === Agent.UNSPECIFIED ? undefined : AGENTS.find((a) => a.value === agent)?.label;
    setTurns((all) => [...all, { ...newTurn(key, text), ...(agentName ? { agent: agentName } : {}) }]);
    const controller = new AbortController();
    abortRef.current = controller;
    const request: MessageInitShape<typeof StreamChatRequestSchema> = {
      sessionId,
      message: text,
      agent,
      model,
      clientMessageId: key, // makes the retry below safe: the server answers a message id once
    };
    let received = false;
    for (let attempt = 0; attempt < 2; attempt++) {
      try {
        for await (const event of api.chat.streamChat(request, { signal: controller.signal })) {
          received = true;
          update(key, (turn) => applyEvent(turn, event));
        }
        return;
      } catch (error) {
        const code = ConnectError.from(error).code;
        if (!received && attempt === 0 && code === Code.Unauthenticated) {
          try {
            await auth.refresh();
            continue;
          } catch (refreshError) {
            error = refreshError;
          }
        }
        const problem = describeError(error);
        update(key, (turn) => fail(turn, problem));
        if (problem.signIn) onError(error);
        return;
      }
    }
  };

  const submit = (event?: FormEvent) => {
    event?.preventDefault();
    const text = draft.trim();
    if (!text || running) return;
    setDraft("");
    void send(text);
  };

  const onKeyDown = (event: KeyboardEvent<HTMLTextAreaElement>) => {
    if (event.key === "Enter" && !event.shiftKey && !event.nativeEvent.isComposing) submit(event);
  };

  const stop = async () => {
    const turn = running;
    const controller = abortRef.current;
    if (!turn || !controller) return;
    if (!turn.generationId) {
      controller.abort(); // not started yet: cancelling the call is the stop
      return;
    }
    try {
      await api.chat.stopGeneration({ generationId: turn.generationId });
    } catch (error) {
      onError(error);
      controller.abort();
      return;
    }
    // The stream ends with a completed(cancelled) event; cut it if that does not come.
    window.setTimeout(() => controller.abort(), STOP_GRACE_MS);
  };

  /** After a decision on an earlier generation: looks at the newest history until its answer shows. */
  const awaitAnswer = async (toolCallId: string) => {
    const poll = new AbortController();
    pollsRef.current.add(poll);
    const known = new Set(historyRef.current.map((m) => m.id));
    const until = Date.now() + ANSWER_POLL.limitMs;
    try {
      for (let delay: number = ANSWER_POLL.firstMs; Date.now() < until; delay = nextDelay(delay)) {
        await sleep(Math.min(delay, Math.max(0, until - Date.now())), poll.signal);
        if (poll.signal.aborted) return;
        try {
          const page = await api.chat.getHistory(
            { sessionId, pageSize: HISTORY_PAGE, order: HistoryOrder.NEWEST_FIRST },
            { signal: poll.signal },
          );
          if (poll.signal.aborted) return;
          const fresh = [...page.messages].reverse();
          const answer = findAnswer(fresh, toolCallId, known);
          if (answer) {
            setHistory((shown) => withAnswer(shown, fresh, answer));
            setPending((all) => all.filter((call) => call.tool.id !== toolCallId));
            return;
          }
        } catch (error) {
          if (poll.signal.aborted) return;
          if (describeError(error).signIn) {
            onError(error);
            break;
          }
          // anything else may pass: look again
        }
      }
      setPending((all) => all.map((call) => (call.tool.id === toolCallId ? { ...call, phase: "late" } : call)));
    } finally {
      pollsRef.current.delete(poll);
    }
  };

  const onDecidePending = async (call: PendingCall, decision: Decision) => {
    const toolCallId = call.tool.id;
    const change = (edit: (tool: ToolActivity) => ToolActivity, phase?: PendingCall["phase"]) =>
      setPending((all) =>
        all.map((c) => (c.tool.id === toolCallId ? { ...c, tool: edit(c.tool), ...(phase ? { phase } : {}) } : c)),
      );
    change((tool) => startToolDecision(tool, decision));
    try {
      const reply = await api.chat.decideToolCall({
        generationId: call.generationId,
        toolCallId,
        approved: decision === "approved",
      });
      if (!reply.accepted) {
        change((tool) => finishToolDecision(tool, { failure: NOT_WAITING }));
        return;
      }
      change((tool) => finishToolDecision(tool, { decision }), "answering");
      setDecided((all) => new Map(all).set(toolCallId, decision));
      void awaitAnswer(toolCallId);
    } catch (error) {
      const problem = describeError(error);
      change((tool) => finishToolDecision(tool, { failure: problem.detail || problem.title }));
      if (problem.signIn) onError(error);
    }
  };

  const decidePending = (call: PendingCall, decision: Decision) => void onDecidePending(call, decision);

  /** The waiting calls by tool call id, and those whose answer is not in the history shown. */
  const pendingById = useMemo(() => new Map(pending.map((call) => [call.tool.id, call])), [pending]);
  const unplaced = useMemo(() => {
    const placed = new Set(history.flatMap(toolCallIds));
    return pending.filter((call) => !placed.has(call.tool.id));
  }, [history, pending]);

  const onDecide = async (generationId: string, key: string, toolCallId: string, decision: Decision) => {
    update(key, (t) => startDecision(t, toolCallId, decision));
    try {
      const reply = await api.chat.decideToolCall({ generationId, toolCallId, approved: decision === "approved" });
      update(key, (t) => finishDecision(t, toolCallId, reply.accepted ? { decision } : { failure: NOT_WAITING }));
    } catch (error) {
      const problem = describeError(error);
      update(key, (t) => finishDecision(t, toolCallId, { failure: problem.detail || problem.title }));
      if (problem.signIn) onError(error);
    }
  };

  return (
    <section className="chat" aria-label="Chat">
      <div className="messages" data-testid="messages">
        {olderPage ? (
          <button type="button" className="link" onClick={() => void loadHistory(olderPage)}>
            Load earlier messages
          </button>
        ) : null}
        {historyLoaded && history.length === 0 && turns.length === 0 && pending.length === 0 ? (
          <p className="muted">No messages yet. Ask about alerts, workspaces or logs.</p>
        ) : null}
        {history.map((message) => (
          <HistoryMessage
            key={message.id}
            message={message}
            pending={pendingById}
            decided={decided}
            onDecide={decidePending}
          />
        ))}
        {unplaced.length ? (
          <article className="message message-assistant" aria-labelledby={pendingHeading} data-testid="pending-block">
            <h2 className="speaker" id={pendingHeading}>
              Waiting for your decision
            </h2>
            {unplaced.map((call) => (
              <PendingCard key={call.tool.id} call={call} onDecide={decidePending} />
            ))}
          </article>
        ) : null}
        {turns.map((turn) => {
          const live = turn.status === "waiting" || turn.status === "streaming";
          const generationId = live ? turn.generationId : undefined;
          return (
            <div key={turn.key} className="turn">
              <article className="message message-you">
                <h2 className="speaker">You</h2>
                <p className="text">{turn.question}</p>
              </article>
              <article
                className="message message-assistant"
                aria-busy={live}
                data-testid="answer"
                data-status={turn.status}
              >
                <h2 className="speaker">{speaker(turn.agent, turn.model)}</h2>
                {turn.thinking ? (
                  <details>
                    <summary>Reasoning</summary>
                    <p className="text muted">{turn.thinking}</p>
                  </details>
                ) : null}
                {turn.tools.map((tool) => (
                  <ToolCard
                    key={tool.id}
                    tool={tool}
                    onDecide={generationId ? (d) => void onDecide(generationId, turn.key, tool.id, d) : undefined}
                  />
                ))}
                <div className="text markdown" data-testid="answer-text">
                  <AnswerText text={turn.answer} streaming={live} />
                  {turn.status === "waiting" ? <span className="muted">Thinking…</span> : null}
                </div>
                {turn.status === "stopped" ? <p className="muted">Stopped.</p> : null}
                {turn.problem && !turn.problem.cancelled ? <ProblemNotice problem={turn.problem} /> : null}
              </article>
            </div>
          );
        })}
        <div ref={endRef} />
      </div>
      <p className="sr-only" aria-live="polite">
        {running ? "The assistant is answering." : turns.length ? "The answer is complete." : ""}
      </p>
      <form className="composer" onSubmit={submit}>
        <label htmlFor="message" className="sr-only">
          Message
        </label>
        <textarea
          id="message"
          value={draft}
          rows={2}
          placeholder="Ask the assistant… (Enter sends, Shift+Enter adds a line)"
          onChange={(e) => setDraft(e.target.value)}
          onKeyDown={onKeyDown}
          autoFocus={focusComposer}
        />
        <div className="composer-options">
          <label>
            Agent{" "}
            <select value={agent} onChange={(e) => setAgent(Number(e.target.value) as Agent)}>
              {AGENTS.map((a) => (
                <option key={a.value} value={a.value}>
                  {a.label}
                </option>
              ))}
            </select>
          </label>
          {models.length > 1 ? (
            <label>
              Model{" "}
              <select value={model} onChange={(e) => setModel(e.target.value)}>
                {models.map((m) => (
                  <option key={m.name} value={m.name}>
                    {m.name}
                  </option>
                ))}
              </select>
            </label>
          ) : null}
          {running ? (
            <button type="button" className="danger" onClick={() => void stop()}>
              Stop
            </button>
          ) : (
            <button type="submit" className="primary" disabled={!draft.trim()}>
              Send
            </button>
          )}
        </div>
      </form>
    </section>
  );
}
