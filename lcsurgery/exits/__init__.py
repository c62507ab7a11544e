"""Early exits: classifier heads attached inside a network, and the policy that decides where each image leaves."""
