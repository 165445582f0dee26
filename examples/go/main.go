// Command example is a small opsmesh client: health, sessions with optimistic concurrency,
// a live task watch and the rich error details every opsmesh error carries.
//
//	through the edge (Envoy checks the token):  go run . -addr localhost:8080 -token "$TOKEN" -health-addr localhost:50051
//	straight to the services: go run . -session-addr localhost:50051 -task-addr localhost:50054 -token "$TOKEN"
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log"
	"time"

	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/structpb"

	errorsv1 "opsmesh.dev/gen/go/opsmesh/errors/v1"
	sessionv1 "opsmesh.dev/gen/go/opsmesh/session/v1"
	taskv1 "opsmesh.dev/gen/go/opsmesh/task/v1"
)

func main() {
	addr := flag.String("addr", "localhost:8080", "the edge (Envoy), or the address of every service")
	sessionAddr := flag.String("session-addr", "", "session service (default -addr)")
	taskAddr := flag.String("task-addr", "", "task service (default -addr)")
	healthAddr := flag.String("health-addr", "", "where to check gRPC health (default -session-addr)")
	token := flag.String("token", "", "access token, sent as 'authorization: Bearer ...'")
	user := flag.String("user", "", "x-opsmesh-user-id, for services in trusted-headers mode (tests; make up refuses it)")
	org := flag.String("org", "", "x-opsmesh-org-id, likewise")
	flag.Parse()
	*sessionAddr = or(*sessionAddr, *addr)
	*taskAddr = or(*taskAddr, *addr)
	*healthAddr = or(*healthAddr, *sessionAddr)

	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	// Every call carries the caller's identity: a bearer token, or headers a trusted hop would set.
	var md []string
	if *token != "" {
		md = append(md, "authorization", "Bearer "+*token)
	}
	if *user != "" {
		md = append(md, "x-opsmesh-user-id", *user, "x-opsmesh-org-id", *org)
	}
	ctx = metadata.AppendToOutgoingContext(ctx, md...)

	// 1. Health ("" is the whole server).
	health, err := healthpb.NewHealthClient(dial(*healthAddr)).Check(ctx, &healthpb.HealthCheckRequest{})
	check(err)
	fmt.Println("health:", health.Status)

	// 2. Sessions: create, get, list.
	sessions := sessionv1.NewSessionServiceClient(dial(*sessionAddr))
	initial, _ := structpb.NewStruct(map[string]interface{}{"env": "dev", "step": 1})
	created, err := sessions.CreateSession(ctx, &sessionv1.CreateSessionRequest{Title: "go example", Context: initial})
	check(err)
	id := created.Session.Id
	fmt.Println("created session", id, "version", created.Session.Version)
	got, err := sessions.GetSession(ctx, &sessionv1.GetSessionRequest{SessionId: id})
	check(err)
	fmt.Println("got session", got.Session.Title, got.Session.Context.AsMap())
	listed, err := sessions.ListSessions(ctx, &sessionv1.ListSessionsRequest{PageSize: 10})
	check(err)
	fmt.Println("listed", len(listed.Sessions), "sessions")

	// 3. Optimistic concurrency: an update with expected_version applies only if nobody changed
	// the session since; a stale version answers ABORTED and changes nothing.
	read := got.Session.Version
	check(update(ctx, sessions, id, read, map[string]interface{}{"step": 2})) // we win
	err = update(ctx, sessions, id, read, map[string]interface{}{"step": 3})  // stale now
	fmt.Println("stale update:", status.Code(err), reason(err))
	if reason(err) != errorsv1.ErrorReason_ERROR_REASON_VERSION_MISMATCH {
		log.Fatalf("expected ABORTED with VERSION_MISMATCH, got %v", err)
	}
	for attempt := 1; ; attempt++ { // the fix: read again, re-apply the change, retry
		current, err := sessions.GetSession(ctx, &sessionv1.GetSessionRequest{SessionId: id})
		check(err)
		err = update(ctx, sessions, id, current.Session.Version, map[string]interface{}{"step": 3})
		if status.Code(err) == codes.Aborted && attempt < 5 {
			continue
		}
		check(err)
		fmt.Println("retried update: applied on attempt", attempt)
		break
	}

	// 4. Tasks: publish one and watch it to its end (the stream closes on a terminal status).
	tasks := taskv1.NewTaskServiceClient(dial(*taskAddr))
	published, err := tasks.PublishWorkspaceTask(ctx, &taskv1.PublishWorkspaceTaskRequest{
		Payload: &taskv1.WorkspaceTaskPayload{
			Action: taskv1.WorkspaceAction_WORKSPACE_ACTION_PROVISION, Workspace: "go-example",
		},
		IdempotencyKey: fmt.Sprintf("go-example-%d", time.Now().UnixNano()), // reuse it to retry safely
	})
	check(err)
	stream, err := tasks.WatchTask(ctx, &taskv1.WatchTaskRequest{TaskId: published.Task.Id})
	check(err)
	for {
		event, err := stream.Recv()
		if errors.Is(err, io.EOF) {
			break
		}
		check(err)
		fmt.Println("task", event.Task.Id, event.Task.Status)
	}

	// 5. Errors: the status details (grpc-status-details-bin) say why, in a machine-readable way.
	_, err = sessions.GetSession(ctx, &sessionv1.GetSessionRequest{SessionId: "not-a-uuid"})
	fmt.Println("error:", status.Code(err), status.Convert(err).Message())
	for _, detail := range status.Convert(err).Details() {
		switch d := detail.(type) {
		case *errdetails.ErrorInfo:
			fmt.Println("  ErrorInfo reason", d.Reason, "domain", d.Domain)
		case *errdetails.BadRequest:
			for _, v := range d.FieldViolations {
				fmt.Println("  BadRequest field", v.Field+":", v.Description)
			}
		}
	}

	_, err = sessions.ExpireSession(ctx, &sessionv1.ExpireSessionRequest{SessionId: id})
	check(err)
	fmt.Println("done")
}

// update merges patch into the session's context if it is still at version expected.
// reason is an opsmesh error's ErrorInfo reason as the contract's enum: the reason string is
// the enum value's name without its ERROR_REASON_ prefix, in the domain opsmesh.dev.
func reason(err error) errorsv1.ErrorReason {
	for _, detail := range status.Convert(err).Details() {
		if info, ok := detail.(*errdetails.ErrorInfo); ok && info.Domain == "opsmesh.dev" {
			return errorsv1.ErrorReason(errorsv1.ErrorReason_value["ERROR_REASON_"+info.Reason])
		}
	}
	return errorsv1.ErrorReason_ERROR_REASON_UNSPECIFIED
}

func update(ctx context.Context, c sessionv1.SessionServiceClient, id string, expected int64, patch map[string]interface{}) error {
	fields, err := structpb.NewStruct(patch)
	if err != nil {
		return err
	}
	_, err = c.UpdateContext(ctx, &sessionv1.UpdateContextRequest{
		SessionId: id, Context: fields, ExpectedVersion: &expected,
	})
	return err
}

// dial opens a plaintext connection (the dev stack); use TLS credentials in production.
func dial(addr string) *grpc.ClientConn {
	conn, err := grpc.Dial(addr, grpc.WithInsecure())
	check(err)
	return conn
}

func or(value, fallback string) string {
	if value != "" {
		return value
	}
	return fallback
}

func check(err error) {
	if err != nil {
		log.Fatal(err)
	}
}
