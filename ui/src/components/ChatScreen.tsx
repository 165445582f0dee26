import { useCallback, useEffect, useState } from "react";
import { SessionView, type Session } from "@gen/opsmesh/session/v1/session_pb.js";
import type { Api } from "../api/transport";
import type { AuthClient } from "../auth/auth";
import { ChatPanel } from "./ChatPanel";

const PAGE = 20;

export function ChatScreen({
  api,
  auth,
  onError,
}: {
  api: Api;
  auth: Pick<AuthClient, "refresh">;
  onError: (error: unknown) => void;
}) {
  const [sessions, setSessions] = useState<Session[]>([]);
  const [nextPage, setNextPage] = useState("");
  const [selected, setSelected] = useState<string | null>(null);
  const [loading, setLoading] = useState(true);
  const [creating, setCreating] = useState(false);
  // The chat the user just made gets the keyboard focus; one picked from the list does not.
  const [created, setCreated] = useState<string | null>(null);

  const load = useCallback(
    async (pageToken: string) => {
      setLoading(true);
      try {
        const page = await api.sessions.listSessions({ pageSize: PAGE, pageToken, view: SessionView.BASIC });
        setSessions((known) => (pageToken ? [...known, ...page.sessions] : page.sessions));
        setNextPage(page.nextPageToken);
        if (!pageToken) setSelected((current) => current ?? page.sessions[0]?.id ?? null);
      } catch (error) {
        onError(error);
      } finally {
        setLoading(false);
      }
    },
    [api, onError],
  );

  useEffect(() => {
    void load("");
  }, [load]);

  const create = async () => {
    setCreating(true);
    try {
      const { session } = await api.sessions.createSession({ title: `Chat ${new Date().toLocaleString()}` });
      if (session) {
        setSessions((known) => [session, ...known]);
        setSelected(session.id);
        setCreated(session.id);
      }
    } catch (error) {
      onError(error);
    } finally {
      setCreating(false);
    }
  };

  return (
    <div className="chat-screen">
      <aside className="sessions" aria-label="Chat sessions">
        <button
          type="button"
          className="primary"
          disabled={creating}
          aria-busy={creating}
          onClick={() => void create()}
        >
          New chat
        </button>
        <ul>
          {sessions.map((session) => (
            <li key={session.id}>
              <button
                type="button"
                aria-current={session.id === selected ? "true" : undefined}
                onClick={() => setSelected(session.id)}
              >
                {session.title || "Untitled chat"}
              </button>
            </li>
          ))}
        </ul>
        {!loading && sessions.length === 0 ? <p className="muted">No chats yet.</p> : null}
        {nextPage ? (
          <button type="button" className="link" disabled={loading} onClick={() => void load(nextPage)}>
            More sessions
          </button>
        ) : null}
      </aside>
      {selected ? (
        <ChatPanel
          key={selected}
          api={api}
          auth={auth}
          sessionId={selected}
          onError={onError}
          focusComposer={selected === created}
        />
      ) : (
        <section className="chat-empty">
          <p>{loading ? "Loading sessions…" : "Start a new chat to talk to the assistant."}</p>
        </section>
      )}
    </div>
  );
}
