// A Go client of opsmesh: copy this folder, point the replace line at your copy of gen/go (or
// drop it once opsmesh.dev/gen/go is published), then `go mod tidy && go run . -help`.
module opsmesh.dev/examples/go

go 1.19

require (
	google.golang.org/genproto v0.0.0-20200526211855-cb27e3aa2013
	google.golang.org/grpc v1.33.3
	google.golang.org/protobuf v1.28.1
	opsmesh.dev/gen/go v0.0.0
)

replace opsmesh.dev/gen/go => ../../gen/go
